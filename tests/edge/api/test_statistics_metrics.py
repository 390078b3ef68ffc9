"""ModelStatistics over gRPC and the Triton-named Prometheus metrics over HTTP agree."""

from __future__ import annotations

import contextlib
import urllib.request

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

TRITON_COUNTERS = ("nv_inference_request_success", "nv_inference_request_failure",
                   "nv_inference_count", "nv_inference_exec_count",
                   "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                   "nv_inference_compute_infer_duration_us")


def _scrape(http_url: str) -> tuple[str, dict[str, dict]]:
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return text, families


def _value(families: dict, name: str, model: str) -> float:
    for sample in families[name].samples:
        if sample.labels.get("model") == model and sample.labels.get("version") == "1":
            return sample.value
    return 0.0


def _infer_seg(client, grpcclient, n: int, batch: int) -> None:
    image = np.zeros((batch, 1, 8, 8), np.float32)
    for _ in range(n):
        inp = grpcclient.InferInput("image", list(image.shape), "FP32")
        inp.set_data_from_numpy(image)
        client.infer("seg", [inp])


def test_statistics_count_requests_and_items(client, grpcclient) -> None:
    def stats() -> dict:
        return client.get_inference_statistics("seg", "1", as_json=True)["model_stats"][0]

    before = stats()
    _infer_seg(client, grpcclient, 5, batch=2)
    after = stats()
    success = int(after["inference_stats"]["success"]["count"]) - int(
        before.get("inference_stats", {}).get("success", {}).get("count", 0))
    assert success == 5
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 10
    assert int(after["inference_stats"]["compute_infer"]["ns"]) > 0


def test_metrics_have_triton_names_types_and_values(client, grpcclient, http_url) -> None:
    _, before = _scrape(http_url)
    failures = 2
    _infer_seg(client, grpcclient, 7, batch=1)
    bad = grpcclient.InferInput("image", [1, 1, 8, 7], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 1, 8, 7), np.float32))
    for _ in range(failures):
        with contextlib.suppress(grpcclient.InferenceServerException):
            client.infer("seg", [bad])
    text, after = _scrape(http_url)

    for name in TRITON_COUNTERS:
        assert f"# TYPE {name} counter" in text
        assert f"{name}_total" not in text
        assert after[name].type == "counter"
    assert after["nv_inference_pending_request_count"].type == "gauge"
    assert 'nv_inference_count{model="seg",version="1"}' in text

    def delta(name: str) -> float:
        return _value(after, name, "seg") - (_value(before, name, "seg") if name in before else 0)

    assert delta("nv_inference_request_success") == 7
    assert delta("nv_inference_request_failure") == failures
    assert delta("nv_inference_count") == 7
    assert 1 <= delta("nv_inference_exec_count") <= 7
    assert delta("nv_inference_compute_infer_duration_us") > 0
    assert _value(after, "nv_inference_pending_request_count", "seg") == 0
    histogram = after["mededge_inference_request_duration_seconds"]
    counts = [s.value for s in histogram.samples
              if s.name.endswith("_count") and s.labels.get("model") == "seg"]
    assert counts and counts[0] >= 7 + failures


def test_health_endpoints(http_url) -> None:
    for path in ("/v2/health/live", "/v2/health/ready"):
        with urllib.request.urlopen(f"{http_url}{path}", timeout=5) as response:
            assert response.status == 200


def test_grpc_health_service(grpc_url) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(grpc_url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(grpc_url) -> None:
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(grpc_url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_reflection_describes_services_from_the_private_pool(grpc_url) -> None:
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    requests = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)
                for name in ("inference.GRPCInferenceService", "grpc.health.v1.Health")]
    with grpc.insecure_channel(grpc_url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    assert len(replies) == 2
    for reply in replies:
        assert reply.WhichOneof("message_response") == "file_descriptor_response", reply
        assert reply.file_descriptor_response.file_descriptor_proto
