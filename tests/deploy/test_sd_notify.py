"""The service's side of ``Type=notify`` + ``WatchdogSec``: a real EdgeServer started with
``$NOTIFY_SOCKET`` sends READY=1, then watchdog pings, then STOPPING=1 (as systemd sees it)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from edge.api import sd_notify
from edge.api.server import EdgeServer
from edge.core.config import load_settings


def _receive_until(sock: socket.socket, wanted: str) -> list[str]:
    seen: list[str] = []
    while wanted not in seen:
        seen.extend(sock.recv(4096).decode().splitlines())
    return seen


def test_server_notifies_ready_watchdog_stopping(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        settings = load_settings(environ={}, overrides={"server": {
            "bind": "127.0.0.1", "grpc_port": 0, "http_port": 0,
            "model_repository": str(tmp_path / "repo"), "data_dir": str(tmp_path / "data")}})
        (tmp_path / "repo").mkdir()
        server = EdgeServer(settings)
        server.start()
        try:
            assert _receive_until(sock, "READY=1")[0] == "READY=1"
            _receive_until(sock, "WATCHDOG=1")
        finally:
            server.stop(1.0)
        assert "STOPPING=1" in _receive_until(sock, "STOPPING=1")


def test_outside_systemd_nothing_is_sent() -> None:
    assert sd_notify.notify("READY=1", {}) is False
    assert sd_notify.watchdog_interval_s({}) is None
    assert sd_notify.watchdog_interval_s({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}) \
        is None  # someone else's watchdog


def test_abstract_socket_and_unhealthy_skips_ping() -> None:
    name = f"mededge-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(0.5)
        env = {"NOTIFY_SOCKET": "@" + name}
        watchdog = sd_notify.Watchdog(lambda: False, 0.05, env).start()
        try:
            with pytest.raises(TimeoutError):
                sock.recv(100)  # unhealthy: no ping, so systemd would restart the service
        finally:
            watchdog.stop()
        assert sd_notify.notify("STOPPING=1", env)
        assert sock.recv(100) == b"STOPPING=1"
