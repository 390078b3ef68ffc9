"""gRPC over TLS and mutual TLS, with tritonclient.grpc as the client (real server on loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tls_material import Pki, edge_server, write_repository

from edge.core.errors import ConfigError
from edge.tools.triton_client import grpcclient

tc = grpcclient()
URL = "127.0.0.1:{port}"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def mtls(repo: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tls = {"enabled": True, "cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
           "ca_file": str(pki.ca), "require_client_cert": True}
    with edge_server(repo, tmp_path_factory.mktemp("data"), grpc={"tls": tls}) as server:
        yield server


def infer(client: Any) -> np.ndarray:
    data = np.arange(4, dtype=np.float32).reshape(1, 4)
    tensor = tc.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(data)
    return client.infer("add", [tensor], client_timeout=10).as_numpy("OUTPUT0")[0]


def test_infer_over_mutual_tls(mtls: Any, pki: Pki) -> None:
    with tc.InferenceServerClient(URL.format(port=mtls.ports.grpc), ssl=True,
                                  root_certificates=str(pki.ca),
                                  private_key=str(pki.client_key),
                                  certificate_chain=str(pki.client_cert)) as client:
        assert client.is_server_ready()
        np.testing.assert_allclose(infer(client), np.arange(4, dtype=np.float32) * 2 + 1)


@pytest.mark.parametrize("who", ["no client certificate", "certificate from another CA"])
def test_client_without_a_trusted_certificate_is_refused(mtls: Any, pki: Pki, who: str) -> None:
    extra = {} if who == "no client certificate" else {
        "private_key": str(pki.rogue_key), "certificate_chain": str(pki.rogue_cert)}
    with tc.InferenceServerClient(URL.format(port=mtls.ports.grpc), ssl=True,
                                  root_certificates=str(pki.ca), **extra) as client, \
            pytest.raises(tc.InferenceServerException) as err:
        infer(client)
    assert err.value.status() == "StatusCode.UNAVAILABLE", err.value


def test_plaintext_client_is_refused(mtls: Any) -> None:
    with tc.InferenceServerClient(URL.format(port=mtls.ports.grpc)) as client, \
            pytest.raises(tc.InferenceServerException):
        infer(client)


def test_server_only_tls_accepts_a_client_without_certificate(
        repo: Path, pki: Pki, tmp_path: Path) -> None:
    tls = {"enabled": True, "cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}
    with edge_server(repo, tmp_path, grpc={"tls": tls}) as server, \
            tc.InferenceServerClient(URL.format(port=server.ports.grpc), ssl=True,
                                     root_certificates=str(pki.ca)) as client:
        np.testing.assert_allclose(infer(client), np.arange(4, dtype=np.float32) * 2 + 1)


def test_a_key_that_is_not_pem_names_the_setting(repo: Path, pki: Pki, tmp_path: Path) -> None:
    bad = tmp_path / "server.key"
    bad.write_text("not a key\n")
    tls = {"enabled": True, "cert_file": str(pki.server_cert), "key_file": str(bad)}
    with pytest.raises(ConfigError, match=r"grpc\.tls\.key_file: .*not a PEM file"), \
            edge_server(repo, tmp_path, grpc={"tls": tls}):
        pass


def test_a_key_that_does_not_match_the_certificate_is_refused(repo: Path, pki: Pki,
                                                                tmp_path: Path) -> None:
    tls = {"enabled": True, "cert_file": str(pki.server_cert), "key_file": str(pki.client_key)}
    with pytest.raises(ConfigError, match=r"grpc\.tls\.cert_file/key_file"), \
            edge_server(repo, tmp_path, grpc={"tls": tls}):
        pass
