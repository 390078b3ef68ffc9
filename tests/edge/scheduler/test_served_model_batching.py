"""Dynamic batching: it batches under concurrency and every request gets its own rows back."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from model_factory import add_scale_config, served, write_add_scale_repo

from edge.core.errors import InvalidInputError
from edge.core.types import InferenceRequest
from edge.scheduler.batcher import BatchPolicy, plan_batch, split_outputs, stack_inputs


def test_plan_batch_full_preferred_and_delay() -> None:
    policy = BatchPolicy(max_items=8, dynamic=True, preferred=(4,), max_delay_ns=1000)
    assert plan_batch(0, 0, policy) is None
    assert plan_batch(9, 0, policy) == 8          # full batch at once
    assert plan_batch(5, 0, policy) == 4          # a preferred size at once
    assert plan_batch(3, 0, policy) is None       # wait for more ...
    assert plan_batch(3, 1000, policy) == 3       # ... until the delay is up
    no_delay = BatchPolicy(max_items=8, dynamic=True)
    assert plan_batch(1, 0, no_delay) == 1        # idle model: dispatch at once
    assert plan_batch(5, 0, BatchPolicy(max_items=8, dynamic=False)) == 5  # caller takes 1
    assert plan_batch(1, 0, BatchPolicy()) == 1   # unbatched model


def test_stack_and_split_keep_rows_with_their_request() -> None:
    parts = [{"x": np.full((n, 2), n, np.float32)} for n in (1, 3, 2)]
    stacked = stack_inputs(parts)
    assert stacked["x"].shape == (6, 2)
    assert stack_inputs(parts[:1])["x"] is parts[0]["x"]  # single request: no copy
    split = split_outputs({"y": stacked["x"] * 10, "z": stacked["x"]}, [1, 3, 2],
                          [("y",), ("y", "z"), ("z",)])
    assert [sorted(s) for s in split] == [["y"], ["y", "z"], ["z"]]
    assert (split[1]["y"] == 30).all() and split[2]["z"].shape == (2, 2)


def _direct(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"INPUT0": x})[0]


def test_concurrent_requests_are_batched_and_answered_with_their_own_rows(
        tmp_path: Path) -> None:
    extra = "dynamic_batching { max_queue_delay_microseconds: 20000 preferred_batch_size: [ 8 ] }"
    write_add_scale_repo(tmp_path, "add", config=add_scale_config("add", 8, extra=extra))
    model = served(tmp_path, "add")
    requests = 48
    inputs = [np.full((1 + i % 3, 4), i, np.float32) for i in range(requests)]
    results: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(8)

    def client(worker: int) -> None:
        barrier.wait()
        for i in range(worker, requests, 8):
            future = model.submit(InferenceRequest("add", {"INPUT0": inputs[i]},
                                                   request_id=str(i)))
            response = future.result(timeout=10)
            assert response.request_id == str(i)
            results[i] = response.outputs["OUTPUT0"]

    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        path = tmp_path / "add" / "1" / "model.onnx"
        for i in range(requests):
            np.testing.assert_array_equal(results[i], _direct(path, inputs[i]))
        stats = model.statistics()
        assert stats.inference_count == sum(len(x) for x in inputs)
        assert stats.inference_stats.success.count == requests
        assert stats.execution_count < requests, "concurrent requests were not batched"
        assert max(b.batch_size for b in stats.batch_stats) > 3
    finally:
        model.close(5)


def test_idle_model_answers_a_single_request_without_waiting_for_a_batch(
        tmp_path: Path) -> None:
    write_add_scale_repo(tmp_path, "add", config=add_scale_config(
        "add", 8, extra="dynamic_batching { }"))
    model = served(tmp_path, "add")
    try:
        x = np.arange(4, dtype=np.float32)[None]
        response = model.submit(InferenceRequest("add", {"INPUT0": x})).result(timeout=5)
        np.testing.assert_array_equal(response.outputs["OUTPUT0"], x * 2 + 1)
        assert model.statistics().execution_count == 1
    finally:
        model.close(5)


def test_a_no_delay_request_dispatches_at_once_with_what_waits(tmp_path: Path) -> None:
    """A 5 s queue delay holds a lone request; a ``no_delay`` one (a sliding window's sized
    batch) is due at once and takes the waiting request along in the same batch."""
    extra = "dynamic_batching { max_queue_delay_microseconds: 5000000 preferred_batch_size: [ 8 ] }"
    write_add_scale_repo(tmp_path, "add", config=add_scale_config("add", 8, extra=extra))
    model = served(tmp_path, "add")
    try:
        x = np.arange(4, dtype=np.float32)[None]
        waiting = model.submit(InferenceRequest("add", {"INPUT0": x}, request_id="waits"))
        time.sleep(0.2)
        assert not waiting.done(), "the queue delay should hold a lone request"
        started = time.monotonic()
        urgent = model.submit(InferenceRequest("add", {"INPUT0": x + 1}, request_id="now",
                                               no_delay=True))
        np.testing.assert_array_equal(urgent.result(timeout=2).outputs["OUTPUT0"],
                                      (x + 1) * 2 + 1)
        np.testing.assert_array_equal(waiting.result(timeout=2).outputs["OUTPUT0"], x * 2 + 1)
        assert time.monotonic() - started < 2.5, "no_delay waited for the queue delay"
        stats = model.statistics()
        assert stats.execution_count == 1 and stats.inference_count == 2
    finally:
        model.close(5)


@pytest.mark.parametrize(("inputs", "outputs", "message"), [
    ({"INPUT1": np.zeros((1, 4), np.float32)}, (), "unknown input 'INPUT1'"),
    ({}, (), "missing input 'INPUT0'"),
    ({"INPUT0": np.zeros((1, 4), np.float64)}, (), "'INPUT0': datatype float64"),
    ({"INPUT0": np.zeros((1, 5), np.float32)}, (), r"shape \[1, 5\] does not match \[4\]"),
    ({"INPUT0": np.zeros((4,), np.float32)}, (), r"expected \[batch, 4\]"),
    ({"INPUT0": np.zeros((9, 4), np.float32)}, (), r"batch size 9 outside 1..8"),
    ({"INPUT0": np.zeros((1, 4), np.float32)}, ("NOPE",), "unknown output 'NOPE'"),
])
def test_invalid_requests_are_refused_naming_the_input(
        tmp_path: Path, inputs: dict[str, np.ndarray], outputs: tuple[str, ...],
        message: str) -> None:
    write_add_scale_repo(tmp_path, "add")
    model = served(tmp_path, "add")
    try:
        with pytest.raises(InvalidInputError, match=message):
            model.submit(InferenceRequest("add", inputs, outputs=outputs))
    finally:
        model.close(5)
