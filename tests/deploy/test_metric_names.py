"""Every metric the Grafana dashboard and the alert rules query exists on a real server's
/metrics (a tiny ONNX model served in-process with the DICOM path running), so the monitoring
cannot drift from the code."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from edge.api.server import EdgeServer
from edge.core.config import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
#: Our families' prefixes; `up` is Prometheus' own.
METRIC = re.compile(r"\b((?:nv|mededge)_[a-z_]+)\b")
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",)}


def _write_model(repo: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])],
                                                "relu", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (repo / "relu" / "1").mkdir(parents=True)
    onnx.save(model, str(repo / "relu" / "1" / "model.onnx"))
    (repo / "relu" / "config.pbtxt").write_text(
        'backend: "onnxruntime"\nmax_batch_size: 4\n'
        'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n')


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """The metric names a running server exposes (samples, and every family's series names)."""
    work = tmp_path_factory.mktemp("server")
    _write_model(work / "repo")
    settings = load_settings(environ={}, overrides={
        "server": {"bind": "127.0.0.1", "grpc_port": 0, "http_port": 0,
                   "data_dir": str(work / "data"), "model_repository": str(work / "repo")},
        "dicom": {"port": 0}, "backend": {"providers": ["CPUExecutionProvider"]}})
    with EdgeServer(settings, dicom=True) as server:
        assert server.ports is not None
        url = f"http://127.0.0.1:{server.ports.http}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        names.update(family + suffix for suffix in SUFFIXES.get(kind, ("",)))
    assert "nv_inference_count" in names, "the model is not ready: no Triton families"
    yield names


def _dashboard_exprs() -> Iterator[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/mededge.json").read_text())

    def walk(node: Any, where: str) -> Iterator[tuple[str, str]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    yield where, value
                else:
                    yield from walk(value, f"{where}/{node.get('title', key)}")
        elif isinstance(node, list):
            for item in node:
                yield from walk(item, where)

    yield from walk(dashboard, "dashboard")


def _alert_exprs() -> Iterator[tuple[str, str]]:
    rules = yaml.safe_load((DEPLOY / "compose/alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield f"alert {rule['alert']}", rule["expr"]


def test_dashboard_structure() -> None:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/mededge.json").read_text())
    assert dashboard["uid"] == "mededge"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = {p["title"] for p in panels}
    assert titles >= {"DICOM throughput", "Queue depth", "Time to result",
                      "Model latency per request", "Deliveries by outcome", "Spool space"}
    for panel in panels:
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        assert panel["gridPos"]["w"] + panel["gridPos"]["x"] <= 24, panel["title"]


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_queried_metrics_exist(exposed: set[str], source: str) -> None:
    exprs = list(_dashboard_exprs() if source == "dashboard" else _alert_exprs())
    assert exprs
    unknown = sorted({f"{where}: {name}" for where, expr in exprs
                      for name in METRIC.findall(expr) if name not in exposed})
    assert not unknown, f"not exposed by /metrics: {unknown}"


def test_dashboard_covers_every_family(exposed: set[str]) -> None:
    """Nothing the server exposes is left off the dashboard (a new family needs a panel)."""
    queried = {name for _, expr in _dashboard_exprs() for name in METRIC.findall(expr)}
    families = {n for n in exposed if METRIC.fullmatch(n) and not n.endswith("_created")}
    bases = {re.sub(r"_(bucket|sum|count)$", "", n) for n in queried}
    missing = sorted(n for n in families
                     if n not in queried and re.sub(r"_(bucket|sum|count)$", "", n) not in bases)
    assert not missing, f"on /metrics but on no panel: {missing}"

