"""Scheduler statistics in the two shapes the front ends need: the ModelStatistics message and
the per-model figures behind the Triton metric families."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge.api.metrics import ModelFigures, RequestCounters
from edge.core.errors import MededgeError
from edge.protos import inference_pb2

if TYPE_CHECKING:
    from edge.scheduler.manager import ModelManager, ServedModel


def _duration(target: Any, stat: Any) -> None:
    target.count = stat.count
    target.ns = stat.ns


def model_statistics_proto(model: ServedModel, counters: RequestCounters
                           ) -> inference_pb2.ModelStatistics:
    """Triton's ModelStatistics message for one served model version."""
    stats = model.statistics()
    version = str(model.id.version)
    out = inference_pb2.ModelStatistics(
        name=model.id.name, version=version, last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count, execution_count=stats.execution_count)
    infer = stats.inference_stats
    _duration(out.inference_stats.success, infer.success)
    _duration(out.inference_stats.fail, infer.fail)
    out.inference_stats.fail.count += counters.refused(model.id.name, version)
    _duration(out.inference_stats.queue, infer.queue)
    _duration(out.inference_stats.compute_input, infer.compute_input)
    _duration(out.inference_stats.compute_infer, infer.compute_infer)
    _duration(out.inference_stats.compute_output, infer.compute_output)
    for batch in stats.batch_stats:
        item = out.batch_stats.add(batch_size=batch.batch_size)
        _duration(item.compute_input, batch.compute_input)
        _duration(item.compute_infer, batch.compute_infer)
        _duration(item.compute_output, batch.compute_output)
    return out


def served_models(manager: ModelManager) -> list[ServedModel]:
    """Every loaded, ready model version (a version unloaded meanwhile is skipped)."""
    models = []
    for entry in manager.index():
        if entry.version is None or str(getattr(entry.state, "value", entry.state)) != "READY":
            continue
        try:
            models.append(manager.get(entry.name, int(entry.version)))
        except MededgeError:
            continue
    return models


def model_figures(manager: ModelManager, counters: RequestCounters) -> list[ModelFigures]:
    """The figures behind ``nv_inference_*`` for every ready model version."""
    rows = []
    for model in served_models(manager):
        stats = model.statistics()
        infer = stats.inference_stats
        version = str(model.id.version)
        rows.append(ModelFigures(
            model=model.id.name, version=version, success=infer.success.count,
            failure=infer.fail.count + counters.refused(model.id.name, version),
            inference_count=stats.inference_count, exec_count=stats.execution_count,
            pending=stats.pending_count, request_us=infer.success.ns // 1000,
            queue_us=infer.queue.ns // 1000, compute_infer_us=infer.compute_infer.ns // 1000))
    return rows
