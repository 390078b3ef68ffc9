"""Series-level work once a series is complete: aggregate, write SEG/SR.

Idempotent: the SEG and SR carry deterministic UIDs (:func:`edge.writers.uids.result_uid`), and
the pipeline's run in the ledger carries the :func:`fingerprint` of its models and instances
(:mod:`edge.pipeline.finalize` records it). Results are yielded one by one as they are written
(:func:`iter_pipeline_results`), so the SEG can be on its way to the PACS while the SR is built.
Per-frame outputs come from the :class:`~edge.pipeline.accumulator.SeriesAccumulator` (already
in the source geometry) where the workers left them, else from the
:class:`~edge.pipeline.slices.SliceStore` on disk.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from edge.core.durable import write_atomically
from edge.core.errors import MededgeError
from edge.core.types import ModelId, Task
from edge.pipeline.accumulator import SeriesAccumulator
from edge.pipeline.slices import SliceStore
from edge.postprocess.aggregate import (
    classify_series,
    segment_series_from_labels,
    threshold_for,
    with_component_counts,
)
from edge.postprocess.nodules3d import detect_series
from edge.postprocess.results import (
    SeriesClassification,
    SeriesDetection,
    SeriesSegmentation,
    SliceDetection,
    VoxelSpacing,
)
from edge.postprocess.slice_boxes import merge_spec, rows_to_boxes
from edge.postprocess.sliding_window import WindowSpec, sliding_window_inference
from edge.preprocess.imaging import restore_geometry
from edge.preprocess.volume import FrameGeometry, assemble_volume, slice_order
from edge.repository.sidecar import Sidecar
from edge.routing.rules import Pipeline
from edge.scheduler.model import ServedModel
from edge.writers.codes import AlgorithmInfo
from edge.writers.seg import build_segmentation
from edge.writers.sr import build_report

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceInstance:
    """A source instance of the series: its header (no pixels) and frame geometry."""

    sop_instance_uid: str
    header: Dataset
    frames: tuple[FrameGeometry, ...]


@dataclass(frozen=True)
class ModelRun:
    """A model that ran on the series: its id and sidecar."""

    model: ModelId
    sidecar: Sidecar


@dataclass(frozen=True)
class ResultFile:
    """One written result object."""

    kind: str  # "seg", "sr", or a heatmap's "sc" / "pm"
    model: ModelId  # the run that owns the object (a combined SR: the segmenter)
    path: Path
    sop_instance_uid: str
    probability: float | None = None  # the series classification the SR reports, if any
    positive: bool | None = None
    volumes_ml: tuple[tuple[str, float], ...] = ()  # per segment label
    detection: SeriesDetection | None = None  # the nodules the SR reports, if any
    classification: SeriesClassification | None = None  # the verdict the SR reports, if any


@dataclass(frozen=True)
class PipelineResults:
    """What a pipeline produced for a series (empty ``files``: nothing to report)."""

    pipeline: Pipeline
    files: tuple[ResultFile, ...]
    instances: tuple[str, ...]  # SOP Instance UIDs the results cover
    fingerprint: str  # of the models and instances: equal -> same results


def fingerprint(models: Sequence[ModelRun], instances: Sequence[str]) -> str:
    text = "|".join(str(m.model) for m in models) + "#" + "|".join(sorted(instances))
    return hashlib.sha256(text.encode()).hexdigest()


def _ordered_outputs(store: SliceStore, series: str, run: ModelRun,
                     sources: Sequence[SourceInstance], cache: SeriesAccumulator | None,
                     restore: tuple[int, int] | None = None,
                     ) -> tuple[list[FrameGeometry], list[np.ndarray]]:
    """Each source frame's output: from ``cache`` (segmenters: already restored), else from
    disk (restored to ``restore`` = rows, columns when given)."""
    frames, outputs = [], []
    for source in sources:
        for frame in source.frames:
            uid, number = source.sop_instance_uid, frame.frame_number
            value = cache.output(series, run.model, uid, number) if cache is not None else None
            if value is None:
                value = store.load(series, run.model, uid, number)
                if value is not None and restore is not None:
                    value = restore_geometry(value, restore, run.sidecar.preprocess)
            if value is not None:
                frames.append(frame)
                outputs.append(value)
    return frames, outputs


def classify(store: SliceStore, series: str, run: ModelRun,
             sources: Sequence[SourceInstance], cache: SeriesAccumulator | None = None,
             ) -> SeriesClassification | None:
    """The series verdict of a classifier from its slice scores (None: no slices).

    Raises:
        ValueError: scores and labels disagree.
    """
    frames, outputs = _ordered_outputs(store, series, run, sources, cache)
    if not frames:
        return None
    order, _, _ = slice_order(frames)
    sidecar = run.sidecar
    positive = str(sidecar.postprocess.get("positive_label") or sidecar.labels[-1])
    return classify_series(
        run.model, sidecar.labels, [frames[i].sop_instance_uid for i in order],
        np.stack([outputs[i] for i in order]), threshold_for(sidecar.thresholds, positive),
        positive_label=positive,
        from_logits=str(sidecar.postprocess.get("activation", "softmax")) != "none",
        method=str(sidecar.postprocess.get("aggregation", "max")))


def detect(store: SliceStore, series: str, run: ModelRun,
           sources: Sequence[SourceInstance], cache: SeriesAccumulator | None = None,
           ) -> SeriesDetection | None:
    """The series result of a detector from its per-frame boxes (None: no slices): slice
    boxes in volume order, merged into 3D candidates with the sidecar's ``merge`` settings.

    Raises:
        ValueError: stored boxes that do not decode, or frames that do not form one stack.
    """
    frames, outputs = _ordered_outputs(store, series, run, sources, cache)
    if not frames:
        return None
    labels = run.sidecar.labels
    # assemble_volume orders the frames and measures the spacing; the "pixels" are dummies
    volume = assemble_volume([np.zeros((1, 1), np.uint8)] * len(frames), frames)
    rows = {(f.sop_instance_uid, f.frame_number): o for f, o in zip(frames, outputs,
                                                                       strict=True)}
    slices = [SliceDetection(f.sop_instance_uid,
                             rows_to_boxes(rows[(f.sop_instance_uid, f.frame_number)], labels))
              for f in volume.frames]
    spacing = VoxelSpacing(row_mm=volume.spacing[1], column_mm=volume.spacing[2],
                           slice_mm=volume.spacing[0])
    return detect_series(run.model, labels, slices, spacing, list(volume.frames),
                         merge_spec(run.sidecar.postprocess))


def segment(store: SliceStore, series: str, run: ModelRun,
            sources: Sequence[SourceInstance], cache: SeriesAccumulator | None = None, *,
            measure_components: bool = True) -> SeriesSegmentation | None:
    """The series label map of a segmenter from its slice maps (None: no slices), in the
    source geometry. ``measure_components`` False leaves the component counts for later
    (:func:`edge.postprocess.aggregate.with_component_counts`).

    Raises:
        DataError: the frames do not form one stack.
        ValueError: label maps and labels disagree.
    """
    shapes = Counter((int(getattr(s.header, "Rows", 0)), int(getattr(s.header, "Columns", 0)))
                     for s in sources)
    if not shapes:
        return None
    shape = shapes.most_common(1)[0][0]  # the main stack; a localizer of another size stays out
    frames, outputs = _ordered_outputs(store, series, run, [
        s for s in sources
        if (int(getattr(s.header, "Rows", 0)), int(getattr(s.header, "Columns", 0))) == shape],
        cache, restore=shape)
    if not frames:
        return None
    volume = assemble_volume(outputs, frames)
    spacing = VoxelSpacing(row_mm=volume.spacing[1], column_mm=volume.spacing[2],
                           slice_mm=volume.spacing[0])
    sidecar = run.sidecar
    return segment_series_from_labels(
        run.model, sidecar.labels, volume.source_sop_instance_uids,
        volume.voxels.astype(np.uint8, copy=False), spacing,
        min_component_voxels=int(sidecar.postprocess.get("min_component_voxels", 0)),
        measure_components=measure_components)


def segment3d(store: SliceStore, series: str, run: ModelRun, sources: Sequence[SourceInstance],
              served: ServedModel, cache: SeriesAccumulator | None = None, *,
              measure_components: bool = True) -> SeriesSegmentation | None:
    """The series label map of a 3D segmenter (sidecar ``postprocess.dims: 3``): the slices the
    workers preprocessed, stacked in volume order, through
    :func:`~edge.postprocess.sliding_window.sliding_window_inference` (windows of
    ``postprocess.patch``, ``overlap``, batched through the scheduler), argmax, each slice
    mapped back to its frame.

    Raises:
        DataError: the frames do not form one stack.
        MededgeError: scheduler or backend failures (queue full, deadline, backend error).
        ValueError: a patch that does not fit the model, or labels that disagree.
    """
    shapes = Counter((int(getattr(s.header, "Rows", 0)), int(getattr(s.header, "Columns", 0)))
                     for s in sources)
    if not shapes:
        return None
    shape = shapes.most_common(1)[0][0]
    frames, slices = _ordered_outputs(store, series, run, [
        s for s in sources
        if (int(getattr(s.header, "Rows", 0)), int(getattr(s.header, "Columns", 0))) == shape],
        cache)
    if not frames:
        return None
    stacked = assemble_volume([s.astype(np.float32) for s in slices], frames)
    post = run.sidecar.postprocess
    window = WindowSpec(size=tuple(int(v) for v in post.get("patch", (32, 64, 64))),
                        overlap=float(post.get("overlap", 0.25)))
    logits = sliding_window_inference(stacked.voxels[None], served, window,
                                      str(post.get("output") or "logits"))
    labels = logits.argmax(axis=0).astype(np.uint8)
    label_map = np.stack([restore_geometry(m, shape, run.sidecar.preprocess) for m in labels])
    spacing = VoxelSpacing(row_mm=stacked.spacing[1], column_mm=stacked.spacing[2],
                           slice_mm=stacked.spacing[0])
    return segment_series_from_labels(
        run.model, run.sidecar.labels, stacked.source_sop_instance_uids, label_map, spacing,
        min_component_voxels=int(post.get("min_component_voxels", 0)),
        measure_components=measure_components)


def write_dataset(dataset: Dataset, path: Path) -> None:
    """Write a DICOM file atomically and durably (fsync file and folder).

    Raises: OSError.
    """
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    write_atomically(path, buffer.getvalue())


def build_pipeline_results(folder: Path, store: SliceStore, series: str, pipeline: Pipeline,
                           runs: Sequence[ModelRun], sources: Sequence[SourceInstance],
                           on_error: Callable[[ModelRun, Exception], None],
                           cache: SeriesAccumulator | None = None) -> PipelineResults:
    """Aggregate each model's slices and write the SEG and SR objects (all of
    :func:`iter_pipeline_results`).

    Raises:
        OSError: a result file cannot be written.
    """
    files = tuple(iter_pipeline_results(folder, store, series, pipeline, runs, sources,
                                        on_error, cache))
    covered = tuple(s.sop_instance_uid for s in sources)
    return PipelineResults(pipeline, files, covered, fingerprint(runs, covered))


def iter_pipeline_results(folder: Path, store: SliceStore, series: str, pipeline: Pipeline,
                          runs: Sequence[ModelRun], sources: Sequence[SourceInstance],
                          on_error: Callable[[ModelRun, Exception], None],
                          cache: SeriesAccumulator | None = None,
                          served_for: Callable[[ModelRun], ServedModel] | None = None,
                          ) -> Iterator[ResultFile]:
    """Aggregate each model's slices and write its objects, yielding each written (fsync'd)
    file at once: every SEG first, then the SRs. Component counts, which only the SR reports,
    are measured after the SEGs were yielded, so a caller that queues each file as it comes
    sends the SEG while the counts and the SR are being made.

    Each segmenter is paired with a classifier (in order) in one TID 1500 report; the others
    get a report of their own, and so does each detector (one group per nodule). A model whose
    aggregation or writing fails is reported to
    ``on_error`` and left out; the others still produce their results.

    Raises:
        OSError: a result file cannot be written.
    """
    segs: list[tuple[ModelRun, SeriesSegmentation]] = []
    classes: list[tuple[ModelRun, SeriesClassification]] = []
    detections: list[tuple[ModelRun, SeriesDetection]] = []
    for run in runs:
        try:
            if run.sidecar.task is Task.SEGMENT and int(run.sidecar.postprocess.get(
                    "dims", 2)) == 3:
                if served_for is None:
                    raise ValueError(f"{run.model}: a 3D segmenter needs the served model")
                seg = segment3d(store, series, run, sources, served_for(run), cache,
                                measure_components=False)
                if seg is not None:
                    segs.append((run, seg))
            elif run.sidecar.task is Task.SEGMENT:
                seg = segment(store, series, run, sources, cache, measure_components=False)
                if seg is not None:
                    segs.append((run, seg))
            elif run.sidecar.task is Task.CLASSIFY:
                cls = classify(store, series, run, sources, cache)
                if cls is not None:
                    classes.append((run, cls))
            elif run.sidecar.task is Task.DETECT:
                det = detect(store, series, run, sources, cache)
                if det is not None:
                    detections.append((run, det))
        except (ValueError, ArithmeticError, MededgeError) as exc:
            on_error(run, exc)
    headers = [s.header for s in sources]
    seg_objects: list[tuple[ModelRun, SeriesSegmentation, Dataset]] = []
    for run, seg in segs:
        algorithm = AlgorithmInfo(run.model.name, str(run.model.version))
        try:
            obj = build_segmentation(seg, headers, algorithm)
        except Exception as exc:  # highdicom raises several types for one bad input
            on_error(run, exc)
            continue
        seg_objects.append((run, seg, obj))
        if "seg" in pipeline.outputs:
            path = folder / f"seg-{run.model.name}-v{run.model.version}.dcm"
            write_dataset(obj, path)
            yield ResultFile("seg", run.model, path, str(obj.SOPInstanceUID),
                             volumes_ml=tuple(seg.volumes_ml.items()))
    if "sr" not in pipeline.outputs:
        return
    for i in range(max(len(seg_objects), len(classes))):
        seg_part = seg_objects[i] if i < len(seg_objects) else None
        cls_arg = classes[i][1] if i < len(classes) else None
        owner = seg_part[0] if seg_part is not None else classes[i][0]
        algorithm = AlgorithmInfo(owner.model.name, str(owner.model.version))
        try:
            seg_arg = (with_component_counts(seg_part[1]), seg_part[2]) \
                if seg_part is not None else None
            report = build_report(headers, algorithm, segmentation=seg_arg,
                                  classification=cls_arg)
        except Exception as exc:  # highdicom raises several types for one bad input
            on_error(owner, exc)
            continue
        path = folder / f"sr-{owner.model.name}-v{owner.model.version}.dcm"
        write_dataset(report, path)
        yield ResultFile(
            "sr", owner.model, path, str(report.SOPInstanceUID),
            cls_arg.probability if cls_arg else None, cls_arg.positive if cls_arg else None,
            tuple(seg_arg[0].volumes_ml.items()) if seg_arg else (), classification=cls_arg)
    for run, det in detections:  # each detector: its own report, one group per nodule
        algorithm = AlgorithmInfo(run.model.name, str(run.model.version))
        try:
            report = build_report(headers, algorithm, detection=det)
        except Exception as exc:  # highdicom raises several types for one bad input
            on_error(run, exc)
            continue
        path = folder / f"sr-{run.model.name}-v{run.model.version}.dcm"
        write_dataset(report, path)
        yield ResultFile("sr", run.model, path, str(report.SOPInstanceUID), detection=det)
