"""Debian's Prometheus scrapes a real mededge server and answers a query about it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from model_factory import add_scale, add_scale_config

from edge.api.server import EdgeServer
from edge.core.config import load_settings
from edge.tools.demo_prometheus import PROMETHEUS, start_prometheus

pytestmark = pytest.mark.skipif(shutil.which(PROMETHEUS) is None,
                                reason="Debian's prometheus is not installed")


def test_prometheus_scrapes_the_serving_metrics(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "add" / "1").mkdir(parents=True)
    add_scale(repo / "add" / "1" / "model.onnx")
    (repo / "add" / "config.pbtxt").write_text(add_scale_config("add"))
    settings = load_settings(environ={}, overrides={"server": {
        "bind": "127.0.0.1", "grpc_port": 0, "http_port": 0, "model_repository": str(repo),
        "data_dir": str(tmp_path / "data")}})
    with EdgeServer(settings) as server:
        assert server.ports is not None
        prometheus = start_prometheus(tmp_path / "prometheus", server.ports.http)
        try:
            samples = prometheus.wait_for('nv_inference_count{model="add"}', timeout_s=60)
        finally:
            prometheus.stop()
    assert [labels["version"] for labels, _ in samples] == ["1"]
    assert samples[0][1] >= 0
