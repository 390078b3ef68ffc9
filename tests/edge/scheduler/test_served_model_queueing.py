"""The bounded queue: full queue, deadlines while busy, priorities, aging, EDF, cancellation.

One instance of a slow MatMul chain is held busy by a large request; what is queued behind it
shows the queue's order. No wall-clock assertions: the tests compare orders of events.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from model_factory import served, slow_matmul

from edge.core.errors import DeadlineExceededError, QueueFullError
from edge.core.types import InferenceRequest, InferenceResponse
from edge.scheduler.model import ServedModel

SIZE = 192
CONFIG = f"""
backend: "onnxruntime"
max_batch_size: 16
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ {SIZE}, {SIZE} ] }} ]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ {SIZE}, {SIZE} ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "1" }} }}
"""
QUEUE = """
dynamic_batching {{ max_queue_delay_microseconds: 0 preferred_batch_size: [ 1 ]
  priority_levels: 2 default_priority_level: 2
  default_queue_policy {{ max_queue_size: {size} }} }}
"""


@pytest.fixture()
def make_model(tmp_path: Path) -> Iterator:
    opened: list[ServedModel] = []

    def make(queue_size: int = 8, **scheduler: object) -> ServedModel:
        name = f"slow{len(opened)}"
        slow_matmul(tmp_path / name / "1" / "model.onnx", steps=48, size=SIZE)
        (tmp_path / name / "config.pbtxt").write_text(CONFIG + QUEUE.format(size=queue_size))
        model = served(tmp_path, name, **scheduler)
        opened.append(model)
        return model

    yield make
    for model in opened:
        model.close(10)


def _x(batch: int = 1) -> np.ndarray:
    return np.ones((batch, SIZE, SIZE), np.float32)


def _busy(model: ServedModel) -> Future[InferenceResponse]:
    """Occupy the single instance with a long request and wait until it is executing."""
    future = model.submit(InferenceRequest("slow", {"X": _x(16)}, request_id="busy"))
    while model.pending_count:
        time.sleep(0.001)
    return future


def _completion_order(futures: list[Future[InferenceResponse]]) -> list[str]:
    order: list[str] = []
    lock = threading.Lock()

    def done(f: Future[InferenceResponse]) -> None:
        with lock:
            order.append(f.result().request_id)

    for f in futures:
        f.add_done_callback(done)
    for f in futures:
        f.result(timeout=20)
    return order


def test_full_queue_rejects_with_queue_full_error(make_model) -> None:
    model = make_model(queue_size=2)
    busy = _busy(model)
    queued = [model.submit(InferenceRequest("slow", {"X": _x()})) for _ in range(2)]
    with pytest.raises(QueueFullError, match="queue full"):
        model.submit(InferenceRequest("slow", {"X": _x()}))
    assert model.statistics().failures_by_reason == {"REJECTED": 1}
    busy.result(timeout=20)
    for f in queued:
        f.result(timeout=20)


def test_deadline_fires_while_the_model_is_busy(make_model) -> None:
    model = make_model()
    busy = _busy(model)
    late = model.submit(InferenceRequest("slow", {"X": _x()}, request_id="late",
                                         deadline=time.monotonic() + 0.02))
    with pytest.raises(DeadlineExceededError, match="'late' passed its deadline"):
        late.result(timeout=20)
    assert not busy.done(), "the deadline fired only after the busy request finished"
    assert model.pending_count == 0  # taken out of the queue, not merely skipped later
    busy.result(timeout=20)
    stats = model.statistics()
    assert stats.execution_count == 1 and stats.failures_by_reason == {"CANCELED": 1}


def test_high_priority_and_earliest_deadline_go_first(make_model) -> None:
    model = make_model()
    busy = _busy(model)
    far = time.monotonic() + 60
    submitted = [
        model.submit(InferenceRequest("slow", {"X": _x()}, request_id="low", priority=2)),
        model.submit(InferenceRequest("slow", {"X": _x()}, request_id="default")),
        model.submit(InferenceRequest("slow", {"X": _x()}, request_id="high-late",
                                      priority=1, deadline=far + 10)),
        model.submit(InferenceRequest("slow", {"X": _x()}, request_id="high-soon",
                                      priority=1, deadline=far)),
    ]
    order = _completion_order([busy, *submitted])
    assert order == ["busy", "high-soon", "high-late", "low", "default"]


def test_aging_lets_a_long_waiting_low_priority_request_through(make_model) -> None:
    model = make_model(aging_ms=5.0)
    busy = _busy(model)
    low = model.submit(InferenceRequest("slow", {"X": _x()}, request_id="low", priority=2))
    time.sleep(0.05)  # low has waited 10 aging periods: it now ranks above a fresh level 1
    high = model.submit(InferenceRequest("slow", {"X": _x()}, request_id="high", priority=1))
    assert _completion_order([busy, low, high]) == ["busy", "low", "high"]


def test_cancel_removes_the_request_from_the_queue(make_model) -> None:
    model = make_model()
    busy = _busy(model)
    doomed = model.submit(InferenceRequest("slow", {"X": _x()}, request_id="doomed"))
    kept = model.submit(InferenceRequest("slow", {"X": _x()}, request_id="kept"))
    assert model.pending_count == 2
    assert doomed.cancel()
    assert model.pending_count == 1
    assert _completion_order([busy, kept]) == ["busy", "kept"]
    assert doomed.cancelled()
    stats = model.statistics()
    assert stats.execution_count == 2  # busy and kept; the cancelled one never ran
    assert stats.failures_by_reason == {"CANCELED": 1}


def test_close_drains_queued_requests(make_model) -> None:
    model = make_model()
    busy = _busy(model)
    queued = [model.submit(InferenceRequest("slow", {"X": _x()}, request_id=str(i)))
              for i in range(3)]
    model.close(20)
    assert busy.result(timeout=0).request_id == "busy"
    assert [f.result(timeout=0).request_id for f in queued] == ["0", "1", "2"]


def test_inline_runs_an_idle_models_request_on_the_callers_thread(make_model) -> None:
    model = make_model()
    future = model.submit(InferenceRequest("slow", {"X": _x()}, request_id="inline"),
                          inline=True)
    assert future.done() and future.result().request_id == "inline"


def test_on_done_answers_an_inline_run_before_its_bookkeeping(make_model) -> None:
    model = make_model()
    seen: list[tuple[str, int]] = []

    def on_done(future: Future[InferenceResponse]) -> None:
        seen.append((future.result(0).request_id, model.statistics().inference_stats.success.count))

    done = model.submit(InferenceRequest("slow", {"X": _x()}, request_id="first"),
                        inline=True, on_done=on_done)
    assert done.done() and seen == [("first", 0)]  # answered before it was counted
    assert model.statistics().inference_stats.success.count == 1  # and counted once submit returned
    queued = model.submit(InferenceRequest("slow", {"X": _x()}, request_id="second"),
                          on_done=on_done)  # run by an instance thread: the callback too
    queued.result(timeout=30)
    deadline = time.monotonic() + 10
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [request_id for request_id, _ in seen] == ["first", "second"]


def test_inline_request_queues_behind_a_busy_instance(make_model) -> None:
    model = make_model()
    busy = _busy(model)
    late = model.submit(InferenceRequest("slow", {"X": _x()}, request_id="late"), inline=True)
    assert not late.done()  # queued, not run beside the busy instance
    assert _completion_order([busy, late]) == ["busy", "late"]


def test_an_inline_execution_holds_the_instance_slot(make_model) -> None:
    """While a large request runs inline on another thread, a small one submitted normally
    waits for the single instance instead of running beside it (it would finish first)."""
    model = make_model()
    inline: list[Future[InferenceResponse]] = []
    started = threading.Event()
    big = InferenceRequest("slow", {"X": _x(16)}, request_id="inline-big")
    thread = threading.Thread(target=lambda: (started.set(), inline.append(
        model.submit(big, inline=True))))
    thread.start()
    started.wait()
    while not model.executing_count:
        time.sleep(0.001)
    small = model.submit(InferenceRequest("slow", {"X": _x()}, request_id="small"))
    thread.join(30)
    assert inline[0].done()
    assert _completion_order([inline[0], small]) == ["inline-big", "small"]


def test_inline_is_off_when_the_batcher_waits_for_company(tmp_path: Path) -> None:
    slow_matmul(tmp_path / "delayed" / "1" / "model.onnx", steps=48, size=SIZE)
    (tmp_path / "delayed" / "config.pbtxt").write_text(
        CONFIG + "dynamic_batching { max_queue_delay_microseconds: 50000 }\n")
    model = served(tmp_path, "delayed")
    try:
        future = model.submit(InferenceRequest("delayed", {"X": _x()}), inline=True)
        assert not future.done()
        future.result(timeout=20)
    finally:
        model.close(10)
