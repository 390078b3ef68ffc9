"""Instances that take every core when alone: the gauge's rule, and real sessions behind it."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from model_factory import served, slow_matmul

from edge.backends.adaptive_threads import AdaptiveThreadsBackend, ExecutionGauge
from edge.core.errors import RepositoryError
from edge.core.types import InferenceRequest

CONFIG = """
name: "mm"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 64, 64 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 64, 64 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
parameters { key: "adaptive_threads" value: { string_value: "true" } }
"""


class _Clock:
    def __init__(self) -> None:
        self.ns = 1_000_000

    def __call__(self) -> int:
        return self.ns


def test_gauge_widens_only_a_batch_that_runs_alone() -> None:
    clock = _Clock()
    gauge = ExecutionGauge(clock)
    assert gauge.enter()  # nothing else runs: alone
    clock.ns += 100
    gauge.leave(clock.ns - 100)  # took 100 ns
    assert gauge.enter() and not gauge.enter()  # the second overlaps the first
    clock.ns += 100
    gauge.leave(clock.ns - 100)
    gauge.leave(clock.ns - 100)
    clock.ns += 50
    assert not gauge.enter(), "an overlap 50 ns ago, the last run took 100 ns: not alone yet"
    clock.ns += 100
    gauge.leave(clock.ns - 100)
    clock.ns += 101
    assert gauge.enter(), "no overlap for longer than the last run: alone again"


def test_two_instances_share_one_wide_session_and_answer_correctly(tmp_path: Path) -> None:
    path = slow_matmul(tmp_path / "mm" / "1" / "model.onnx", steps=30, size=64)
    (tmp_path / "mm" / "config.pbtxt").write_text(CONFIG)
    model = served(tmp_path, "mm")
    instances = model.instances
    try:
        assert len(instances) == 2
        assert all(isinstance(b, AdaptiveThreadsBackend) for b in instances)
        assert "alone:" in model.backend_description
        x = np.random.default_rng(0).random((2, 64, 64), dtype=np.float32)
        expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"X": x})[0]

        def ask() -> np.ndarray:
            request = InferenceRequest("mm", {"X": x})
            return model.submit(request).result(timeout=30).outputs["Y"]

        np.testing.assert_allclose(ask(), expected, rtol=1e-5)
        runs = [(b.wide_runs, b.narrow_runs) for b in instances]  # type: ignore[attr-defined]
        assert sum(w for w, _ in runs) >= 1 and sum(n for _, n in runs) == 0, runs

        answers: list[np.ndarray] = []
        lock = threading.Lock()

        def client() -> None:
            for _ in range(20):
                y = ask()
                with lock:
                    answers.append(y)

        clients = [threading.Thread(target=client) for _ in range(4)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(60)
        assert len(answers) == 80
        for y in answers:
            np.testing.assert_allclose(y, expected, rtol=1e-5)
        narrow = sum(b.narrow_runs for b in instances)  # type: ignore[attr-defined]
        assert narrow > 0, "four clients on two instances never overlapped"
    finally:
        model.close()
    assert all(b.closed for b in instances)


def test_adaptive_threads_with_a_shared_session_is_refused_naming_both(tmp_path: Path) -> None:
    slow_matmul(tmp_path / "mm" / "1" / "model.onnx", steps=2, size=64)
    (tmp_path / "mm" / "config.pbtxt").write_text(
        CONFIG + 'parameters { key: "share_session" value: { string_value: "true" } }\n')
    with pytest.raises(RepositoryError, match=r"adaptive_threads.*share_session"):
        served(tmp_path, "mm")
