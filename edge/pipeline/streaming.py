"""Per-instance streaming inference: runs on the worker pool as each instance arrives.

A worker reads the instance, routes its series (once, cached by the caller), and for each 2D
model that applies decodes (once), preprocesses and submits every frame to the scheduler,
keeping each output in the :class:`~edge.pipeline.slices.SliceStore` (crash safety) and in the
:class:`~edge.pipeline.accumulator.SeriesAccumulator` (a segmenter's label map already mapped
back to the frame's geometry), together with the header without pixel data, so the series'
finalize only assembles.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from edge.core.config import Settings
from edge.core.errors import (
    DataError,
    MededgeError,
    ModelNotFoundError,
    ModelNotReadyError,
    QueueFullError,
)
from edge.core.types import InferenceRequest, InferenceResponse, ModelId, Task
from edge.jobs.ledger import InstanceState, Ledger, RunState
from edge.pipeline.accumulator import SeriesAccumulator, SourceHeader, strip_pixels
from edge.pipeline.context import ContextBuffer, ContextJob
from edge.pipeline.intake import InstanceTask
from edge.pipeline.slices import SliceStore, slice_output
from edge.postprocess.aggregate import threshold_for
from edge.postprocess.slice_boxes import decode_frame
from edge.preprocess.dicom_pixels import decode
from edge.preprocess.imaging import preprocess_image, restore_geometry
from edge.preprocess.volume import FrameGeometry, frame_geometries
from edge.routing.rules import Routing
from edge.routing.series import DimsePriority, SeriesInfo
from edge.scheduler.manager import ModelManager
from edge.scheduler.model import ServedModel

LOG = logging.getLogger(__name__)
_QUEUE_FULL_BACKOFF_S = 0.01


def scheduler_priority(dimse: int, rule_priority: int, levels: int) -> int:
    """The scheduler level (1 highest, 0 the model's default) for a slice request."""
    if rule_priority:
        return rule_priority
    if dimse == DimsePriority.HIGH:
        return 1
    if dimse == DimsePriority.LOW and levels > 1:
        return levels
    return 0


def record_reason(ledger: Ledger, task: InstanceTask, reason: str, failed: bool) -> None:
    """Record why an instance gets no result (a run with the reason) and finish it.

    Raises: OutOfResourcesError, LedgerError.
    """
    run = ledger.create_run(task.series_instance_uid, "failed" if failed else "skipped", "",
                            task.sop_instance_uid)
    ledger.set_run_state(run, RunState.FAILED if failed else RunState.SKIPPED, reason)
    ledger.set_instance_state(task.sop_instance_uid, InstanceState.DONE)


class InstanceProcessor:
    """Processes one instance at a time (thread-safe: no state of its own besides the
    injected collaborators)."""

    def __init__(self, settings: Settings, ledger: Ledger, manager: ModelManager,
                 store: SliceStore, accumulator: SeriesAccumulator,
                 routing_for: Callable[[SeriesInfo], Routing],
                 expect: Callable[[str, int], None], stopping: Callable[[], bool],
                 context: ContextBuffer | None = None) -> None:
        self._settings = settings
        self._context = context if context is not None else ContextBuffer()
        self._ledger = ledger
        self._manager = manager
        self._store = store
        self._accumulator = accumulator
        self._routing_for = routing_for
        self._expect = expect
        self._stopping = stopping

    def process(self, task: InstanceTask) -> str:
        """Infer one instance with every model of its series' pipelines; the outcome
        ``inferred``, ``skipped`` or ``failed`` (then its reason is in the ledger).

        Raises: OutOfResourcesError, LedgerError (recording a reason), OSError.
        """
        try:
            ds = pydicom.dcmread(task.path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            record_reason(self._ledger, task, f"unreadable: {exc}", failed=True)
            return "failed"
        info = SeriesInfo.from_header(ds, task.calling_ae, task.priority)
        if info.images_in_acquisition:
            self._expect(info.series_instance_uid, info.images_in_acquisition)
        routing = self._routing_for(info)
        if not routing.pipelines:
            record_reason(self._ledger, task, f"skipped: {routing.skipped}", failed=False)
            return "skipped"
        frames = frame_geometries(ds)
        decoded = None
        problems: list[str] = []
        done = 0
        for pipeline in routing.pipelines:
            for name in pipeline.models:
                try:
                    served = self._manager.get(name)
                except (ModelNotFoundError, ModelNotReadyError) as exc:
                    problems.append(f"{name}: {exc}")
                    continue
                if served.sidecar is None:
                    problems.append(f"{name}: no sidecar (task, preprocessing unknown)")
                    continue
                if self._store.has(task.series_instance_uid, served.id, task.sop_instance_uid,
                                   len(frames)):
                    done += 1
                    continue
                if decoded is None:
                    try:
                        decoded = decode(ds, task.sop_instance_uid)
                    except DataError as exc:
                        record_reason(self._ledger, task, f"decode failure: {exc}", failed=True)
                        return "failed"
                try:
                    self._infer(task, served, decoded.frames, decoded.meta, pipeline.priority,
                                info.priority, frames)
                    done += 1
                except (MededgeError, ValueError) as exc:
                    problems.append(f"{name}: {type(exc).__name__}: {exc}")
        if problems:
            LOG.warning("instance %s: %s", task.sop_instance_uid, "; ".join(problems))
            if not done:
                record_reason(self._ledger, task, "; ".join(problems), failed=True)
                return "failed"
        self._accumulator.add_header(task.series_instance_uid, task.sop_instance_uid,
                                     SourceHeader(strip_pixels(ds), frames))
        return "inferred"

    def _infer(self, task: InstanceTask, served: ServedModel, frames: np.ndarray,
               meta: Any, rule_priority: int, dimse: int,
               geometry: Sequence[FrameGeometry] = ()) -> None:
        """Infer every frame of one instance with one model; keep the outputs. A 2.5D model
        (``context_slices`` > 0) keeps each preprocessed slice and runs the slices whose
        neighbours are all known (:class:`~edge.pipeline.context.ContextBuffer`).

        Raises: MededgeError (scheduler, backend, deadline), ValueError (shapes), OSError.
        """
        sidecar = served.sidecar
        assert sidecar is not None
        spec = sidecar.preprocess
        levels = int(served.config.dynamic_batching.priority_levels)
        priority = scheduler_priority(dimse, rule_priority, levels)
        series, uid = task.series_instance_uid, task.sop_instance_uid
        volumetric = int(sidecar.postprocess.get("dims", 2)) == 3
        for index, frame in enumerate(frames):
            x = preprocess_image(frame, meta, spec)[np.newaxis]
            shape = (int(frame.shape[0]), int(frame.shape[1]))
            if volumetric:  # a 3D model: keep the preprocessed slice for finalize's window
                value = x[0, 0].astype(np.float16)
                self._store.save(series, served.id, uid, index + 1, value)
                self._accumulator.add_output(series, served.id, uid, index + 1, value)
                continue
            if spec.context_slices:  # 2.5D: runs once its neighbours are known
                where = geometry[index] if index < len(geometry) else FrameGeometry(uid, index + 1)
                self._store.save(series, served.id, uid, index + 1, x[0, 0], kind="input")
                jobs = self._context.add(series, served.id, spec.context_slices, where, x[0, 0],
                                         shape, spec.context_spacing_mm)
                self._run_context(series, served, jobs, priority)
                continue
            self._run_one(series, served, uid, index + 1, x, shape, priority)

    def _run_one(self, series: str, served: ServedModel, uid: str, frame: int, x: np.ndarray,
                 shape: tuple[int, int], priority: int) -> None:
        """Infer one model input (1, C, H, W) and keep its output for frame ``frame`` of
        ``uid`` (original size ``shape``).

        Raises: MededgeError (scheduler, backend, deadline), ValueError (shapes), OSError.
        """
        sidecar = served.sidecar
        assert sidecar is not None
        spec = sidecar.preprocess
        input_spec = served.inputs[0]
        output = str(sidecar.postprocess.get("output") or served.outputs[0].name)
        threshold = threshold_for(sidecar.thresholds, sidecar.labels[-1])
        response = self._submit(served, {input_spec.name: x.astype(input_spec.dtype)},
                                priority, uid)
        if sidecar.task is Task.DETECT:  # decoded now: boxes in the frame's geometry
            value = decode_frame(response.outputs, sidecar.labels, shape, spec,
                                 sidecar.thresholds, sidecar.postprocess)
        else:
            value = slice_output(sidecar.task, response.outputs[output][0], threshold)
        self._store.save(series, served.id, uid, frame, value)
        if sidecar.task is Task.SEGMENT:  # restored now, while the series streams
            value = restore_geometry(value, shape, spec)
        self._accumulator.add_output(series, served.id, uid, frame, value)

    def _run_context(self, series: str, served: ServedModel, jobs: Sequence[ContextJob],
                     priority: int) -> None:
        """Run claimed 2.5D slices; a failed one is released for completion to retry.

        Raises: MededgeError, ValueError, OSError (the first failure, after releasing it and
        the rest).
        """
        for n, job in enumerate(jobs):
            try:
                self._run_one(series, served, job.key[0], job.key[1], job.inputs,
                              job.source_shape, priority)
            except BaseException:
                for left in jobs[n:]:
                    self._context.forget(series, served.id, left.key)
                raise

    def complete_context(self, series: str, served: ServedModel,
                         frames: Sequence[FrameGeometry],
                         shapes: Mapping[str, tuple[int, int]]) -> int:
        """At series completion, run a 2.5D model on every slice still without an output or
        whose early neighbours differ from the final volume order; returns how many ran.
        ``frames``: every frame of the series, ``shapes``: (rows, columns) per instance.

        Raises: MededgeError (scheduler, backend, deadline), ValueError, OSError.
        """
        sidecar = served.sidecar
        assert sidecar is not None
        k = sidecar.preprocess.context_slices
        model = served.id
        jobs = self._context.at_completion(
            series, model, k, frames, shapes,
            lambda key: self._store.load(series, model, key[0], key[1], kind="input"),
            lambda key: self._store.path(series, model, key[0], key[1]).is_file(),
            sidecar.preprocess.context_spacing_mm)
        self._run_context(series, served, jobs, 0)
        return len(jobs)

    def context_input(self, series: str, model: ModelId, sop_instance_uid: str,
                      frame: int = 1) -> np.ndarray | None:
        """A 2.5D slice's model input as it last ran (None: not kept), for a second
        inference of the same slice (the CAM at finalize)."""
        return self._context.input_for(series, model, (sop_instance_uid, frame))

    def forget_series(self, series: str) -> None:
        """Drop what the 2.5D buffer keeps of a finished series."""
        self._context.drop(series)

    def _submit(self, served: ServedModel, inputs: Mapping[str, np.ndarray], priority: int,
                request_id: str) -> InferenceResponse:
        """Submit and wait; a full queue is backpressure: wait and retry until the deadline.

        Raises: QueueFullError, DeadlineExceededError, BackendError, InvalidInputError.
        """
        deadline = time.monotonic() + self._settings.pipeline.deadline_s
        while True:
            try:
                future = served.submit(InferenceRequest(
                    model=served.id.name, version=served.id.version, inputs=inputs,
                    request_id=request_id, priority=priority, deadline=deadline))
            except QueueFullError:
                if time.monotonic() >= deadline or self._stopping():
                    raise
                time.sleep(_QUEUE_FULL_BACKOFF_S)
                continue
            return future.result()
