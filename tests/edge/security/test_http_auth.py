"""/metrics behind a token (Bearer or Basic) and TLS; health stays open unless configured."""

from __future__ import annotations

import base64
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tls_material import (
    INFER_TOKEN,
    METRICS_TOKEN,
    Pki,
    edge_server,
    token_entry,
    write_repository,
)

from edge.core.errors import ConfigError

TOKENS = [token_entry("prometheus", METRICS_TOKEN, "metrics"),
          token_entry("reader", INFER_TOKEN, "infer")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def server(repo: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tls = {"enabled": True, "cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}
    with edge_server(repo, tmp_path_factory.mktemp("data"), auth={"tokens": TOKENS},
                     http={"tls": tls, "metrics_auth": True, "bind": "127.0.0.1"}) as running:
        yield running


def get(server: Any, pki: Pki, path: str, authorization: str | None = None) -> int:
    context = ssl.create_default_context(cafile=str(pki.ca))
    request = urllib.request.Request(f"https://127.0.0.1:{server.ports.http}{path}")
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_metrics_need_a_metrics_token(server: Any, pki: Pki) -> None:
    assert get(server, pki, "/metrics") == 401
    assert get(server, pki, "/metrics", "Bearer wrong-token") == 401
    assert get(server, pki, "/metrics", f"Bearer {INFER_TOKEN}") == 403
    assert get(server, pki, "/metrics", f"Bearer {METRICS_TOKEN}") == 200


def test_basic_auth_is_the_token_name_and_the_token(server: Any, pki: Pki) -> None:
    assert get(server, pki, "/metrics", basic("prometheus", METRICS_TOKEN)) == 200
    assert get(server, pki, "/metrics", basic("someone", METRICS_TOKEN)) == 401
    assert get(server, pki, "/metrics", basic("prometheus", "guess")) == 401


def test_health_stays_open(server: Any, pki: Pki) -> None:
    assert get(server, pki, "/v2/health/live") == 200
    assert get(server, pki, "/v2/health/ready") == 200


def test_plain_http_to_the_tls_port_gets_nothing(server: Any, pki: Pki) -> None:
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{server.ports.http}/v2/health/live",
                               timeout=5).read()
    assert get(server, pki, "/v2/health/live") == 200  # and the server still answers


def test_a_silent_client_does_not_block_others(server: Any, pki: Pki) -> None:
    with socket.create_connection(("127.0.0.1", server.ports.http)):
        assert get(server, pki, "/v2/health/live") == 200


def test_health_auth_protects_health_too(repo: Path, tmp_path: Path) -> None:
    with edge_server(repo, tmp_path, auth={"tokens": TOKENS},
                     http={"health_auth": True}) as running:
        url = f"http://127.0.0.1:{running.ports.http}/v2/health/live"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=5)
        assert err.value.code == 401
        assert err.value.headers["WWW-Authenticate"].startswith("Bearer")
        request = urllib.request.Request(url, headers={"Authorization":
                                                       f"Bearer {METRICS_TOKEN}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200


def test_metrics_auth_without_tokens_stops_start_up(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"http\.metrics_auth: no tokens"), \
            edge_server(repo, tmp_path, http={"metrics_auth": True}):
        pass
