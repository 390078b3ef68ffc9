"""De-identification of remote backend calls, against real mededge gRPC servers as the remote:
no DICOM UID in what the remote sees (request id, parameters), ids mapped back on the box; and
the remote channel over mutual TLS with a bearer token."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from tls_material import INFER_TOKEN, Pki, edge_server, token_entry, write_repository

from edge.api.grpc_server import GrpcServer
from edge.api.infer_wire import parse_infer_request
from edge.api.inference_service import InferenceServicer
from edge.api.metrics import RequestCounters
from edge.backends.base import BackendOptions
from edge.backends.deidentify import Pseudonymizer, carries_uid
from edge.backends.remote_kserve import RemoteKServeBackend, RemoteTarget
from edge.core.config import load_settings
from edge.core.errors import BackendError, RepositoryError
from edge.scheduler.manager import ModelManager

STUDY_UID = "1.2.840.113619.2.55.3.604688119.971.1712345678.7"
SERIES_UID = "1.3.12.2.1107.5.1.4.73104.30000024051812345678900000012"
PATIENT_ID = "PID-987654321"
OPAQUE = re.compile(r"^[0-9a-f]{32}$")


class RecordingServicer(InferenceServicer):
    """The real KServe v2 servicer, keeping what each ModelInfer request carried."""

    def __init__(self, manager: ModelManager, counters: RequestCounters) -> None:
        super().__init__(manager, counters)
        self.seen: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()

    def _record(self, message: Any) -> None:
        with self._lock:
            self.seen.append((message.id, {k: str(v) for k, v in message.parameters.items()}))

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._record(request.message)  # grpcio serving the port
        return super().ModelInfer(request, context)

    def start_infer(self, payload: bytes, *args: Any) -> Any:
        self._record(parse_infer_request(payload).message)  # the native front end (default)
        return super().start_infer(payload, *args)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def remote(repo: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[str, RecordingServicer]]:
    settings = load_settings(None, {
        "server": {"model_repository": str(repo),
                   "data_dir": str(tmp_path_factory.mktemp("data"))},
        "backend": {"providers": ["CPUExecutionProvider"], "intra_op_threads": 1},
        "repository": {"warmup": False}}, environ={})
    manager = ModelManager(settings)
    manager.start()
    servicer = RecordingServicer(manager, RequestCounters())
    server = GrpcServer(servicer, settings.grpc)
    endpoint = server.start("127.0.0.1", 0)
    yield f"127.0.0.1:{endpoint.port}", servicer
    server.stop(1.0)
    manager.close(1.0)


def ones() -> dict[str, np.ndarray]:
    return {"INPUT0": np.ones((1, 4), np.float32)}


def test_remote_sees_no_uid_and_the_id_comes_back(remote: tuple[str, RecordingServicer]) -> None:
    url, servicer = remote
    local_id = f"{STUDY_UID}/{SERIES_UID}/slice-12"
    with RemoteKServeBackend(RemoteTarget(url, "add"), BackendOptions(batched=True)) as backend:
        result = backend.infer_request(ones(), local_id, {
            "series_instance_uid": SERIES_UID, "priority": 1, "timeout": STUDY_UID,
            "patient": PATIENT_ID})
        assert backend.pseudonymizer.in_flight == 0
    np.testing.assert_allclose(result.outputs["OUTPUT0"], np.full((1, 4), 3.0))
    assert result.id == local_id  # re-identified on the box
    sent_id, sent_parameters = servicer.seen[-1]
    assert OPAQUE.match(sent_id), sent_id
    assert sent_parameters.keys() == {"priority"}  # timeout held a UID; others not allowed
    everything = sent_id + repr(sent_parameters)
    for secret in (STUDY_UID, SERIES_UID, PATIENT_ID, "slice-12"):
        assert secret not in everything
    assert not carries_uid(everything)


def test_plain_infer_sends_an_opaque_id_too(remote: tuple[str, RecordingServicer]) -> None:
    url, servicer = remote
    with RemoteKServeBackend(RemoteTarget(url, "add"), BackendOptions(batched=True)) as backend:
        backend.infer(ones())
        backend.infer(ones())
    (first, params1), (second, params2) = servicer.seen[-2:]
    assert OPAQUE.match(first) and OPAQUE.match(second) and first != second
    assert params1 == params2 == {}


def test_pseudonymizer_refuses_ids_it_did_not_send() -> None:
    pseudonymizer = Pseudonymizer(identifiers=[PATIENT_ID])
    sent = pseudonymizer.outbound("job-1", {"priority": f"x{PATIENT_ID}", "timeout": 5})
    assert dict(sent.parameters) == {"timeout": 5}
    with pytest.raises(BackendError, match="not in flight"):
        pseudonymizer.inbound("0" * 32)
    assert pseudonymizer.inbound(sent.id) == "job-1"
    with pytest.raises(BackendError):
        pseudonymizer.inbound(sent.id)  # once only


@pytest.mark.parametrize(("text", "uid"), [(STUDY_UID, True), (f"job-{SERIES_UID}-x", True),
                                           ("2.25.329800735698586629295641978511506172918", True),
                                           ("1.2.3", False), ("0.5", False), ("v2.1.0", False),
                                           ("job-17", False)])
def test_uid_shapes(text: str, uid: bool) -> None:
    assert carries_uid(text) is uid


# --- TLS and a token to the remote -------------------------------------------------------------

@pytest.fixture(scope="module")
def secured(repo: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A remote mededge requiring mutual TLS and a token with the infer right."""
    tls = {"enabled": True, "cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
           "ca_file": str(pki.ca), "require_client_cert": True}
    with edge_server(repo, tmp_path_factory.mktemp("secured"),
                     grpc={"tls": tls, "require_token": True},
                     auth={"tokens": [token_entry("edge-box", INFER_TOKEN, "infer")]}) as server:
        yield server


def target(server: Any, pki: Pki, tmp_path: Path, **extra: str) -> RemoteTarget:
    token = tmp_path / "remote.token"
    token.write_text(INFER_TOKEN + "\n")
    params = {"remote_url": f"grpcs://localhost:{server.ports.grpc}",
              "remote_model_name": "add", "remote_ca_file": str(pki.ca),
              "remote_cert_file": str(pki.client_cert), "remote_key_file": str(pki.client_key),
              "remote_token_file": str(token), "remote_connect_timeout_s": "5", **extra}
    params = {k: v for k, v in params.items() if v}
    return RemoteTarget.from_parameters(params, tmp_path / "remote_add" / "1" / "model.onnx")


def test_remote_over_mutual_tls_with_a_token(secured: Any, pki: Pki, tmp_path: Path) -> None:
    with RemoteKServeBackend(target(secured, pki, tmp_path),
                             BackendOptions(batched=True)) as backend:
        outputs = backend.infer(ones())
    np.testing.assert_allclose(outputs["OUTPUT0"], np.full((1, 4), 3.0))


def test_remote_without_the_token_is_refused(secured: Any, pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="UNAUTHENTICATED"):
        RemoteKServeBackend(target(secured, pki, tmp_path, remote_token_file=""),
                            BackendOptions(batched=True))


def test_remote_without_a_client_certificate_is_refused(secured: Any, pki: Pki,
                                                        tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="UNAVAILABLE|DEADLINE"):
        RemoteKServeBackend(target(secured, pki, tmp_path, remote_cert_file="",
                                   remote_key_file="", remote_connect_timeout_s="2"),
                            BackendOptions(batched=True))


def test_a_missing_ca_file_names_the_parameter(secured: Any, pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match=r"remote_tls.*ca_file: .*no such file"):
        RemoteKServeBackend(target(secured, pki, tmp_path,
                                   remote_ca_file=str(tmp_path / "absent.pem")),
                            BackendOptions(batched=True))
