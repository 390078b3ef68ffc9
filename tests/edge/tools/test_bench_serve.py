"""``mededge bench serve`` plumbing: the table, the output check, the Triton venv probe and
stopping a server's whole process group. No timing is asserted (DESIGN: benchmarks, not tests)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.tools.bench_serve import (
    MEDEDGE,
    MIN_B1_REQUESTS,
    RAW,
    SHM,
    STREAM,
    STREAM_SHM,
    TRITON,
    UNARY,
    BenchModel,
    Result,
    _encoded_requests,
    _median,
    bench_server,
    drive,
    encoded_request,
    markdown,
    paired_b1,
    paired_throughput,
    start_mededge,
    verify_shared_memory,
    with_ratios,
)
from edge.tools.bench_triton import (
    OutputMismatch,
    TritonUnavailable,
    check_outputs,
    stop_group,
    venv_python,
)

EXPECTED = np.arange(6, dtype=np.float32).reshape(1, 6)


def test_check_outputs_accepts_equal_outputs() -> None:
    check_outputs("server", lambda x: EXPECTED.copy(), EXPECTED, EXPECTED)


@pytest.mark.parametrize(("answer", "reason"), [
    (np.zeros((0,), np.float32), "empty output"),
    (None, "empty output"),
    (np.zeros((1, 3), np.float32), "output shape"),
    (EXPECTED + 1, "differ from raw"),
])
def test_check_outputs_fails_loudly(answer: np.ndarray | None, reason: str) -> None:
    with pytest.raises(OutputMismatch, match=reason):
        check_outputs("triton", lambda x: answer, EXPECTED, EXPECTED)


def test_missing_triton_venv_is_unavailable_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(TritonUnavailable, match="make venv-triton"):
        venv_python(tmp_path / "nothing")


def test_a_numpy_2_venv_is_refused(tmp_path: Path) -> None:
    # This test's own interpreter has numpy 2 (and perhaps pytriton): not a Triton reference.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    with pytest.raises(TritonUnavailable, match="not usable"):
        venv_python(venv)


def test_stop_group_stops_the_children_too(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
              "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the child did not start"
        time.sleep(0.05)
    child = int(pid_file.read_text())
    stop_group(proc, grace_s=10)
    assert proc.poll() is not None
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the grandchild survived stop_group"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (reaped by init soon) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] != "Z"


def test_markdown_ratios_against_the_better_raw_throughput() -> None:
    results = [
        Result("m", RAW, 10.0, 12.0, throughput=100.0, throughput_max=110.0, mean_batch=8.0),
        Result("m", MEDEDGE, 10.5, 13.0, throughput=99.0, mean_batch=3.5),
        Result("m", TRITON, note="FAILED output check, not timed: triton: empty output"),
    ]
    table = markdown(results, batch=1, clients=8)
    assert "| m | mededge | 10.50 | 13.00 | +0.50 | 99.0 | 3.5 | 90.0% | 99.0% |" in table
    assert "| m | onnxruntime (raw), b8 | - | - | - | 110.0 | 8 | reference | - |" in table
    assert "FAILED output check" in table


def test_median_over_rounds_skips_missing_figures() -> None:
    rows = [Result("m", MEDEDGE, 1.0, 2.0, 10.0, mean_batch=None),
            Result("m", MEDEDGE, 3.0, 4.0, 30.0, mean_batch=2.0),
            Result("m", MEDEDGE, 2.0, 9.0, 20.0, mean_batch=4.0)]
    median = _median(rows)
    assert (median.p50_ms, median.p99_ms, median.throughput, median.mean_batch) == \
        (2.0, 4.0, 20.0, 3.0)


def _probe_model(repo: Path) -> BenchModel:
    """A near-zero-compute model: input [N,3,8,8] -> its per-channel mean [N,3]."""
    from onnx import TensorProto, helper

    from edge.tools.bench_models import write_model

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["logits"], axes=[2, 3], keepdims=0)],
        "probe", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    write_model(repo, "probe", model)
    return BenchModel("probe", "input", "logits", (3, 8, 8), (3,))


def test_encoded_request_is_a_kserve_request_for_the_tensor() -> None:
    from edge.protos import inference_pb2

    spec = BenchModel("m", "image", "out", (2, 3))
    x = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    request = inference_pb2.ModelInferRequest.FromString(encoded_request(spec, x))
    assert (request.model_name, request.inputs[0].name, request.inputs[0].datatype) == (
        "m", "image", "FP32")
    assert list(request.inputs[0].shape) == [2, 2, 3]
    assert [o.name for o in request.outputs] == ["out"]
    assert request.raw_input_contents[0] == x.tobytes()


def test_clients_drive_a_real_mededge_server(tmp_path: Path) -> None:
    spec = _probe_model(tmp_path / "repo")
    proc, url = start_mededge(tmp_path / "repo", tmp_path, threads=1)
    try:
        latencies, throughput = drive(url, spec, batch=2, clients=2, seconds=0.5)
    finally:
        stop_group(proc)
    assert latencies and throughput == len(latencies) * 2 / 0.5


def test_streaming_clients_drive_a_real_mededge_server_and_errors_surface(tmp_path: Path
                                                                         ) -> None:
    spec = _probe_model(tmp_path / "repo")
    proc, url = start_mededge(tmp_path / "repo", tmp_path, threads=1)
    try:
        latencies, _ = drive(url, spec, batch=1, clients=2, seconds=0.5, transport=STREAM)
        assert latencies
        missing = BenchModel("absent", "input", "logits", (3, 8, 8))
        with pytest.raises(RuntimeError, match="absent"):  # the server's NOT_FOUND message
            drive(url, missing, batch=1, clients=1, seconds=0.5, transport=STREAM)
        result = bench_server(MEDEDGE, url, missing, 1, 1, 0.5)
        assert result.p50_ms is None and "failed" in result.note
    finally:
        stop_group(proc)


def test_shared_memory_clients_drive_a_real_mededge_server(tmp_path: Path) -> None:
    import onnxruntime as ort

    spec = _probe_model(tmp_path / "repo")
    proc, url = start_mededge(tmp_path / "repo", tmp_path, threads=1)
    try:
        verify_shared_memory(MEDEDGE, url, spec, ort.InferenceSession(
            str(tmp_path / "repo" / "probe" / "1" / "model.onnx"),
            providers=["CPUExecutionProvider"]))
        latencies, _ = drive(url, spec, batch=2, clients=2, seconds=0.5, transport=SHM)
        assert latencies
        latencies, _ = drive(url, spec, batch=1, clients=1, seconds=0.5, transport=STREAM_SHM)
        assert latencies
        wrong = BenchModel("probe", "input", "logits", (3, 8, 8), (2,))  # region too small
        with pytest.raises(RuntimeError, match="does not fit|do not fit"):
            drive(url, wrong, batch=1, clients=1, seconds=0.5, transport=SHM)
    finally:
        stop_group(proc)
    leftovers = [p.name for p in Path("/dev/shm").glob("bench-*")]
    assert not leftovers, f"regions left behind: {leftovers}"


def test_a_shared_memory_request_names_its_regions() -> None:
    from edge.protos import inference_pb2

    spec = BenchModel("m", "image", "out", (2, 3), (5,))
    x = np.zeros((4, 2, 3), np.float32)
    request = inference_pb2.ModelInferRequest.FromString(encoded_request(spec, x, ("i", "o")))
    assert not request.raw_input_contents
    params = request.inputs[0].parameters
    assert (params["shared_memory_region"].string_param,
            params["shared_memory_byte_size"].int64_param) == ("i", x.nbytes)
    out = request.outputs[0].parameters
    assert (out["shared_memory_region"].string_param,
            out["shared_memory_byte_size"].int64_param) == ("o", 4 * 5 * 4)


def test_a_client_that_dies_without_reporting_is_an_error_not_a_wait() -> None:
    import multiprocessing as mp

    from edge.tools.bench_serve import _collect

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=os._exit, args=(3,))
    proc.start()
    with pytest.raises(RuntimeError, match=r"exit codes \[3\]"):
        _collect(out, [proc], deadline=time.monotonic() + 60)
    proc.join()


# --- the C++ load generator (edge/tools/loadgen) ---------------------------------------------

@pytest.fixture(scope="module")
def loadgen_binary() -> Path:
    """Built from the sources (g++, protoc, grpc_cpp_plugin, grpc++: .ci/run installs them)."""
    from edge.tools import loadgen

    binary = loadgen.build()
    assert os.access(binary, os.X_OK)
    return binary


def _probe_session(repo: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(repo / "probe" / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])


def test_cpp_clients_drive_a_real_mededge_server_over_every_transport(
        tmp_path: Path, loadgen_binary: Path) -> None:
    spec = _probe_model(tmp_path / "repo")
    sess = _probe_session(tmp_path / "repo")
    proc, url = start_mededge(tmp_path / "repo", tmp_path, threads=1)
    try:
        for transport in (UNARY, STREAM, SHM, STREAM_SHM):
            served, raw_b1, raw_max = paired_throughput(loadgen_binary, url, spec, 2, 2, 0.4,
                                                        transport, sess)
            assert served > 0 and raw_b1 > 0 and raw_max > 0, transport
    finally:
        stop_group(proc)
    leftovers = [p.name for p in Path("/dev/shm").glob("bench-*")]
    assert not leftovers, f"regions left behind: {leftovers}"


def test_cpp_client_errors_surface_with_the_servers_message(tmp_path: Path,
                                                            loadgen_binary: Path) -> None:
    _probe_model(tmp_path / "repo")
    sess = _probe_session(tmp_path / "repo")
    proc, url = start_mededge(tmp_path / "repo", tmp_path, threads=1)
    try:
        missing = BenchModel("absent", "input", "logits", (3, 8, 8), (3,))
        for transport in (UNARY, STREAM):
            with pytest.raises(RuntimeError, match="absent"):  # the server's NOT_FOUND message
                paired_throughput(loadgen_binary, url, missing, 1, 2, 0.5, transport, sess)
        other = BenchModel("probe", "input", "nope", (3, 8, 8), (3,))
        with pytest.raises(RuntimeError, match="nope"):
            paired_b1(loadgen_binary, url, other, 0.5, UNARY, sess)
        result = bench_server(MEDEDGE, url, missing, 1, 1, 0.5, STREAM, loadgen_binary, sess)
        assert result.p50_ms is None and "absent" in result.note
    finally:
        stop_group(proc)


def test_paired_batch1_alternates_the_server_with_the_reference(tmp_path: Path,
                                                                 loadgen_binary: Path) -> None:
    from edge.tools import loadgen

    spec = _probe_model(tmp_path / "repo")
    sess = _probe_session(tmp_path / "repo")
    proc, url = start_mededge(tmp_path / "repo", tmp_path, threads=1)
    blocks: list[tuple[float, float]] = []

    def reference(seconds: float) -> list[float]:
        start = time.monotonic()
        time.sleep(seconds)
        blocks.append((start, time.monotonic()))
        return [seconds]

    try:
        with _encoded_requests(url, spec, 1, 1, STREAM_SHM) as requests:
            (server,), ref = loadgen.paired(loadgen_binary, url, requests, spec.output, 1.0,
                                            True, True, reference, blocks=4)
        assert len(blocks) == 4 and ref == [0.25] * 4
        gaps = [b[0] - a[1] for a, b in itertools.pairwise(blocks)]
        assert all(g >= 0.2 for g in gaps), f"the client's blocks did not run between: {gaps}"
        assert len(server) > 4
        # several clients: all of them run between the reference's blocks, timed together
        blocks.clear()
        with _encoded_requests(url, spec, 1, 3, STREAM_SHM) as requests:
            clients, ref = loadgen.paired(loadgen_binary, url, requests, spec.output, 0.9,
                                          True, True, reference, blocks=3)
        gaps = [b[0] - a[1] for a, b in itertools.pairwise(blocks)]
        assert len(clients) == 3 and all(len(c) > 3 for c in clients)
        assert len(blocks) == 3 and all(g >= 0.3 for g in gaps), gaps
        row = bench_server(MEDEDGE, url, spec, 2, 2, 0.5, STREAM_SHM, loadgen_binary, sess)

        class Slow:  # a 5 ms model: 0.1 s would be 20 requests, fewer than the minimum
            def run(self, names: Any, feed: Any) -> Any:
                time.sleep(0.005)
                return sess.run(names, feed)

        started = time.monotonic()
        _, slow_ref = paired_b1(loadgen_binary, url, spec, 0.1, STREAM_SHM, Slow())
        took = time.monotonic() - started
    finally:
        stop_group(proc)
    assert len(slow_ref) >= 0.8 * MIN_B1_REQUESTS and took >= MIN_B1_REQUESTS * 0.005
    assert row.p50_ms is not None and row.raw_p50_ms is not None and row.throughput
    assert row.raw_throughput and row.raw_throughput_max and row.vs_raw is None
    # the ratios: against the better raw figure of the paired blocks and of the round's raw row
    slow_raw = Result("probe", RAW, 1.0, 2.0, throughput=row.raw_throughput / 2,
                      throughput_max=row.raw_throughput_max / 2)
    paired = with_ratios(row, slow_raw)
    assert paired.vs_raw == pytest.approx(
        row.throughput / max(row.raw_throughput, row.raw_throughput_max))
    assert paired.vs_raw_b1 == pytest.approx(row.throughput / row.raw_throughput)
    fast_raw = replace(slow_raw, throughput=row.raw_throughput * 4)
    assert with_ratios(row, fast_raw).vs_raw_b1 == pytest.approx(
        row.throughput / (row.raw_throughput * 4))
    table = markdown([Result("probe", RAW, 1.0, 2.0, 10.0, 20.0),
                      replace(row, p50_ms=1.5, raw_p50_ms=0.75, vs_raw=0.5, vs_raw_b1=0.25)],
                     1, 2)
    # added and the ratios against the paired raw blocks, not the raw row
    assert "| +0.75 |" in table and "| 50.0% | 25.0% |" in table
