"""Which 2.5D slices run while a series streams, and which wait for its completion."""

from __future__ import annotations

import numpy as np

from edge.core.types import ModelId
from edge.pipeline.context import ContextBuffer
from edge.preprocess.volume import FrameGeometry

MODEL = ModelId("ctx", 1)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SHAPE = (4, 4)


def frame(number: int | None, z: float, uid: str | None = None) -> FrameGeometry:
    return FrameGeometry(uid or f"sop{number}-{z}", 1, (0.0, 0.0, z), AXIAL, (0.7, 0.7),
                         number)


def value(z: float) -> np.ndarray:
    return np.full(SHAPE, z, np.float32)


def add(buffer: ContextBuffer, f: FrameGeometry, k: int = 1) -> list[str]:
    z = f.position[2] if f.position else 0.0
    return [job.key[0] for job in buffer.add("s", MODEL, k, f, value(z), (8, 8))]


def test_a_slice_runs_once_both_neighbours_are_proven() -> None:
    buffer = ContextBuffer()
    frames = [frame(n, 2.0 * n) for n in range(1, 6)]
    assert add(buffer, frames[0]) == []
    assert add(buffer, frames[2]) == []  # slice 2 missing between them
    assert add(buffer, frames[1]) == [frames[1].sop_instance_uid]  # 2 has 1 and 3
    assert add(buffer, frames[4]) == []
    assert add(buffer, frames[3]) == [frames[2].sop_instance_uid, frames[3].sop_instance_uid]
    done = {frames[1].sop_instance_uid, frames[2].sop_instance_uid, frames[3].sop_instance_uid}
    jobs = buffer.at_completion("s", MODEL, 1, frames, {}, lambda key: None,
                                lambda key: key[0] in done)
    assert [j.key[0] for j in jobs] == [frames[0].sop_instance_uid, frames[4].sop_instance_uid]
    first = jobs[0].inputs[0, :, 0, 0]
    np.testing.assert_array_equal(first, [2.0, 2.0, 4.0])  # the end slice is repeated


def test_interleaved_arrival_never_runs_a_slice_with_wrong_neighbours() -> None:
    buffer = ContextBuffer()
    frames = [frame(n, 1.0 * n) for n in range(1, 8)]
    for f in frames[::2]:  # 1, 3, 5, 7: a regular stack, but numbers say 2, 4, 6 are missing
        assert add(buffer, f) == []
    ran = []
    for f in frames[1::2]:
        ran += add(buffer, f)
    assert sorted(ran) == sorted(f.sop_instance_uid for f in frames[1:-1])
    jobs = buffer.at_completion("s", MODEL, 1, frames, {}, lambda key: None, lambda key: True)
    assert [j.key[0] for j in jobs] == [frames[0].sop_instance_uid, frames[-1].sop_instance_uid]


def test_without_instance_numbers_everything_waits_for_completion() -> None:
    buffer = ContextBuffer()
    frames = [frame(None, 3.0 * n, f"u{n}") for n in range(5)]
    for f in reversed(frames):
        assert add(buffer, f) == []
    jobs = buffer.at_completion("s", MODEL, 1, frames, {}, lambda key: None, lambda key: False)
    assert [j.key[0] for j in jobs] == [f.sop_instance_uid for f in frames]
    np.testing.assert_array_equal(jobs[2].inputs[0, :, 0, 0], [3.0, 6.0, 9.0])


def test_a_late_slice_between_two_others_reruns_its_neighbours() -> None:
    buffer = ContextBuffer()
    # numbers consecutive, but the last arrival lies between two that already ran
    a, b, c, d = frame(1, 0.0), frame(2, 2.0), frame(3, 4.0), frame(4, 6.0)
    ran = [uid for f in (a, b, c, d) for uid in add(buffer, f)]
    assert ran == [b.sop_instance_uid, c.sop_instance_uid]
    late = frame(9, 3.0, "late")
    assert add(buffer, late) == []  # its number proves nothing: waits
    everything = [a, b, c, d, late]
    jobs = buffer.at_completion("s", MODEL, 1, everything, {}, lambda key: None,
                                lambda key: True)
    # the ends never ran; b and c ran with each other as neighbours, now "late" lies between
    assert [j.key[0] for j in jobs] == [a.sop_instance_uid, b.sop_instance_uid, "late",
                                        c.sop_instance_uid, d.sop_instance_uid]
    np.testing.assert_array_equal(jobs[1].inputs[0, :, 0, 0], [0.0, 2.0, 3.0])
    assert buffer.at_completion("s", MODEL, 1, everything, {}, lambda key: None,
                                lambda key: True) == []


def test_completion_reloads_slices_a_restart_lost() -> None:
    buffer = ContextBuffer()
    frames = [frame(n, float(n)) for n in range(1, 4)]
    stored = {(f.sop_instance_uid, 1): value(float(n)) for n, f in enumerate(frames, 1)}
    shapes = {f.sop_instance_uid: (8, 8) for f in frames}
    jobs = buffer.at_completion("s", MODEL, 1, frames, shapes, stored.get, lambda key: True)
    assert len(jobs) == 3
    np.testing.assert_array_equal(jobs[1].inputs[0, :, 0, 0], [1.0, 2.0, 3.0])
    assert jobs[1].source_shape == (8, 8)


def test_mm_context_waits_until_the_points_it_needs_are_covered() -> None:
    buffer = ContextBuffer()
    frames = [frame(n, 1.0 * n) for n in range(1, 12)]  # 1 mm apart
    ran: list[str] = []
    for f in frames:  # in order; k = 1 at 3 mm: slice n needs n - 3 .. n + 3
        ran += [j.key[0] for j in buffer.add("s", MODEL, 1, f, value(f.position[2]), (8, 8),
                                             3.0)]
    assert ran == [f.sop_instance_uid for f in frames[3:8]]  # slices 4 .. 8
    job = buffer.at_completion("s", MODEL, 1, frames, {}, lambda key: None, lambda key: True,
                               3.0)
    assert [j.key[0] for j in job] == [f.sop_instance_uid for f in frames[:3] + frames[8:]]
    np.testing.assert_array_equal(job[0].inputs[0, :, 0, 0], [1.0, 1.0, 4.0])
    np.testing.assert_array_equal(buffer.input_for("s", MODEL, (frames[5].sop_instance_uid, 1))
                                  [0, :, 0, 0], [3.0, 6.0, 9.0])
