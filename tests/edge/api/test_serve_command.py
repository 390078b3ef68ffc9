"""``mededge serve`` as a real subprocess: printed ports, SIGTERM drains and exits 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

PORT_LINE = re.compile(r"^mededge: (grpc|http) listening on ([\d.]+):(\d+)$")


def _start(repo: Path, data_dir: Path, ports_file: Path) -> tuple[subprocess.Popen, dict]:
    env = dict(os.environ, MEDEDGE_BACKEND__PROVIDERS="[CPUExecutionProvider]")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "serve", "--model-repository", str(repo),
         "--data-dir", str(data_dir), "--bind", "127.0.0.1", "--grpc-port", "0",
         "--http-port", "0", "--dicom-port", "0", "--ports-file", str(ports_file),
         "--destination", "PACS@127.0.0.1:11113"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ports: dict[str, int] = {}
    deadline = time.monotonic() + 60
    while len(ports) < 2 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        match = PORT_LINE.match(line.strip())
        if match:
            ports[match.group(1)] = int(match.group(3))
    if len(ports) < 2:
        proc.kill()
        pytest.fail(f"no port lines; stderr: {proc.stderr.read()[-2000:]}")
    return proc, ports


def test_serve_prints_ports_and_drains_on_sigterm(repository: Path, tmp_path: Path,
                                                  grpcclient) -> None:
    proc, ports = _start(repository, tmp_path / "data", tmp_path / "ports.json")
    try:
        assert json.loads((tmp_path / "ports.json").read_text())["grpc"] == ports["grpc"]
        url = f"127.0.0.1:{ports['grpc']}"
        with grpcclient.InferenceServerClient(url) as client:
            assert client.is_server_ready()
        results: list = []

        def infer() -> None:
            with grpcclient.InferenceServerClient(url) as client:
                x = grpcclient.InferInput("x", [1, 1], "FP32")
                x.set_data_from_numpy(np.ones((1, 1), np.float32))
                try:
                    results.append(client.infer("slow", [x]).as_numpy("y"))
                except grpcclient.InferenceServerException as exc:
                    results.append(exc)

        thread = threading.Thread(target=infer)
        thread.start()
        time.sleep(0.1)  # the slow request is in flight
        proc.send_signal(signal.SIGTERM)
        thread.join(30)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert len(results) == 1 and not isinstance(results[0], Exception), results
    assert "mededge: stopped" in out
    assert re.search(r"serving: grpc \S+ \(native\)", err), err[-2000:]  # the C++ front end


def test_serve_rejects_a_bad_config_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("server:\n  grpc_port: 99999\n")
    proc = subprocess.run([sys.executable, "-m", "edge.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "server.grpc_port" in proc.stderr
