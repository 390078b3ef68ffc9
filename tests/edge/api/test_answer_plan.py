"""An answer encoded before the run (``plan_answer`` / ``encode_planned``) is the answer
``encode_outputs`` gives after it, byte for byte once parsed, with outputs in the message and
in a real POSIX shared-memory region; outputs that come out otherwise than planned fall back
with nothing written."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from multiprocessing import shared_memory

import numpy as np
import pytest

from edge.api.infer_wire import WireInferResponse, serialize_infer_response
from edge.api.shared_memory import SharedMemoryRegistry
from edge.api.tensor_codec import (
    ShmPlacement,
    encode_outputs,
    encode_planned,
    plan_answer,
)
from edge.protos import inference_pb2

SPECS = [("logits", "FP32", (2, 5)), ("labels", "INT64", (2,))]


@pytest.fixture()
def registry() -> Iterator[tuple[SharedMemoryRegistry, np.ndarray]]:
    """A registry with region "out" (256 bytes of a real /dev/shm object) and a view of it."""
    key = f"/mededge-plan-{uuid.uuid4().hex[:8]}"
    block = shared_memory.SharedMemory(name=key, create=True, size=256)
    registry = SharedMemoryRegistry()
    registry.register("out", key, 0, 256)
    view = np.ndarray((256,), np.uint8, buffer=block.buf)
    view[:] = 0
    yield registry, view
    registry.unregister("")
    del view
    block.close()
    block.unlink()


def _head() -> inference_pb2.ModelInferResponse:
    return inference_pb2.ModelInferResponse(model_name="m", model_version="2", id="req-9")


def _outputs() -> dict[str, np.ndarray]:
    return {"logits": np.linspace(-1, 1, 10, dtype=np.float32).reshape(2, 5),
            "labels": np.array([3, 1], np.int64)}


def _parsed(message: inference_pb2.ModelInferResponse | bytes,
            raw: tuple[np.ndarray, ...]) -> inference_pb2.ModelInferResponse:
    return inference_pb2.ModelInferResponse.FromString(
        serialize_infer_response(WireInferResponse(message, raw)))


@pytest.mark.parametrize("placed", [{}, {"labels": ShmPlacement("out", 64, 40)},
                                    {"logits": ShmPlacement("out", 40, 0),
                                     "labels": ShmPlacement("out", 16, 128)}],
                         ids=["in-message", "one-in-shm-at-offset", "all-in-shm"])
def test_a_planned_answer_is_the_encoded_answer(registry, placed) -> None:
    shm, view = registry
    plan = plan_answer(_head(), SPECS, placed)
    assert plan is not None
    raw = encode_planned(plan, _outputs(), placed, shm)
    assert raw is not None
    planned_bytes = view.copy()
    view[:] = 0
    message = _head()
    expected_raw = encode_outputs(message, _outputs(), [n for n, _, _ in SPECS], placed, shm)
    assert _parsed(plan.head, raw) == _parsed(message, expected_raw)
    np.testing.assert_array_equal(planned_bytes, view)  # the same bytes in shared memory
    if "labels" in placed:
        offset = placed["labels"].offset
        np.testing.assert_array_equal(view[offset:offset + 16].view(np.int64), [3, 1])


def test_outputs_unlike_the_plan_fall_back_with_nothing_written(registry) -> None:
    shm, view = registry
    placed = {"logits": ShmPlacement("out", 80, 0)}
    plan = plan_answer(_head(), SPECS, placed)
    assert plan is not None
    outputs = _outputs()
    outputs["labels"] = np.array([3, 1, 2], np.int64)  # another batch than planned
    assert encode_planned(plan, outputs, placed, shm) is None
    outputs = _outputs()
    outputs["labels"] = outputs["labels"].astype(np.int32)  # another dtype
    assert encode_planned(plan, outputs, placed, shm) is None
    assert not view.any()


@pytest.mark.parametrize("specs, placed", [
    ([("logits", "FP32", (2, -1))], {}),  # a dynamic dimension
    ([("text", "BYTES", (2,))], {}),  # no fixed item size
    ([("logits", "FP32", (2, 5))], {"logits": ShmPlacement("out", 16, 0)}),  # too small
])
def test_no_plan_where_the_answer_cannot_be_known_ahead(specs, placed) -> None:
    assert plan_answer(_head(), specs, placed) is None
