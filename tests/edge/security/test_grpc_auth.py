"""Bearer tokens on gRPC with a real server and tritonclient: UNAUTHENTICATED without a valid
token, PERMISSION_DENIED without the right, health open, tokens never in the logs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tls_material import INFER_TOKEN, REPO_TOKEN, edge_server, token_entry, write_repository

from edge.core.errors import ConfigError
from edge.tools.triton_client import grpcclient

tc = grpcclient()
ROGUE_TOKEN = "not-a-configured-token-5e1f"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Tokens: ``reader`` (infer) in the settings, ``admin`` (repository) in a tokens file."""
    data = tmp_path_factory.mktemp("data")
    tokens_file = data / "tokens.yaml"
    tokens_file.write_text(yaml.safe_dump([token_entry("admin", REPO_TOKEN, "repository")]))
    with edge_server(repo, data, grpc={"require_token": True},
                     auth={"tokens": [token_entry("reader", INFER_TOKEN, "infer")],
                           "tokens_file": str(tokens_file)}) as running:
        yield running


@pytest.fixture()
def client(server: Any) -> Iterator[Any]:
    with tc.InferenceServerClient(f"127.0.0.1:{server.ports.grpc}") as opened:
        yield opened


def infer(client: Any, headers: dict[str, str] | None) -> Any:
    tensor = tc.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    return client.infer("add", [tensor], headers=headers, client_timeout=10)


def status(call: Any) -> str:
    with pytest.raises(tc.InferenceServerException) as err:
        call()
    return str(err.value.status())


@pytest.mark.parametrize("headers", [None, bearer(ROGUE_TOKEN), {"authorization": INFER_TOKEN},
                                     {"authorization": "Basic " + INFER_TOKEN}])
def test_no_valid_token_is_unauthenticated(client: Any, headers: dict[str, str] | None) -> None:
    assert status(lambda: infer(client, headers)) == "StatusCode.UNAUTHENTICATED"
    assert status(lambda: client.get_model_metadata("add", headers=headers)) \
        == "StatusCode.UNAUTHENTICATED"


def test_infer_token_infers_but_cannot_touch_the_repository(client: Any) -> None:
    result = infer(client, bearer(INFER_TOKEN)).as_numpy("OUTPUT0")
    np.testing.assert_allclose(result, np.full((1, 4), 3.0, np.float32))
    assert client.get_model_metadata("add", headers=bearer(INFER_TOKEN)).name == "add"
    for call in (lambda: client.unload_model("spare", headers=bearer(INFER_TOKEN)),
                 lambda: client.load_model("spare", headers=bearer(INFER_TOKEN)),
                 lambda: client.get_model_repository_index(headers=bearer(INFER_TOKEN))):
        assert status(call) == "StatusCode.PERMISSION_DENIED"
    assert client.is_model_ready("spare", headers=bearer(INFER_TOKEN))


def test_repository_token_loads_and_unloads_but_cannot_infer(client: Any) -> None:
    client.unload_model("spare", headers=bearer(REPO_TOKEN))
    assert not client.is_model_ready("spare", headers=bearer(INFER_TOKEN))
    client.load_model("spare", headers=bearer(REPO_TOKEN))
    assert client.is_model_ready("spare", headers=bearer(INFER_TOKEN))
    assert status(lambda: infer(client, bearer(REPO_TOKEN))) == "StatusCode.PERMISSION_DENIED"


def test_health_needs_no_token(server: Any, client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    with grpc.insecure_channel(f"127.0.0.1:{server.ports.grpc}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_streaming_infer_needs_a_token(client: Any) -> None:
    results: list[Any] = []
    client.start_stream(callback=lambda result, error: results.append(error))
    tensor = tc.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    # the stream may already have ended (refused before any request is read)
    with contextlib.suppress(tc.InferenceServerException):
        client.async_stream_infer("add", [tensor])
    client.stop_stream()
    assert results and results[0] is not None and "UNAUTHENTICATED" in str(results[0].status())


def test_tokens_never_reach_the_logs(client: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        for token in (INFER_TOKEN, REPO_TOKEN, ROGUE_TOKEN):
            with contextlib.suppress(tc.InferenceServerException):
                infer(client, bearer(token))
            with contextlib.suppress(tc.InferenceServerException):
                client.unload_model("absent", headers=bearer(token))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "refused" in text  # the refusals were logged ...
    for token in (INFER_TOKEN, REPO_TOKEN, ROGUE_TOKEN):
        assert token not in text  # ... without the token


def test_required_tokens_without_any_configured_stop_start_up(repo: Path,
                                                               tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"grpc\.require_token: no tokens"), \
            edge_server(repo, tmp_path, grpc={"require_token": True}):
        pass


def test_a_bad_tokens_file_names_the_key(repo: Path, tmp_path: Path) -> None:
    bad = tmp_path / "tokens.yaml"
    bad.write_text(yaml.safe_dump([{"name": "x", "sha256": "short", "rights": ["infer"]}]))
    with pytest.raises(ConfigError, match=r"auth\.tokens_file: .*0\.sha256"), \
            edge_server(repo, tmp_path, auth={"tokens_file": str(bad)}):
        pass
