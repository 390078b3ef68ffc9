"""Series finalize: once a series is complete, its results are built, recorded and queued.

For each pipeline of the series: skip it when a ``done`` run with the same fingerprint (models
+ instances) exists; otherwise record a run with that fingerprint, and queue each result object
for every destination *as soon as it is written* (the SEG is on its way to the PACS while the
SR is built), then set the run ``done``: that state is what makes finishing the same instances
again a no-op (:func:`edge.jobs.queries.pipeline_done`). A crash before ``done`` rebuilds and
re-queues under the same UIDs, which the PACS treats as a replacement. Instances become
``done`` only after every pipeline was handled.

Source headers and per-frame outputs come from the
:class:`~edge.pipeline.accumulator.SeriesAccumulator` (gathered while the series streamed),
else from the spool and the :class:`~edge.pipeline.slices.SliceStore`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from edge.core.config import Settings
from edge.core.errors import MededgeError, ModelNotFoundError, ModelNotReadyError
from edge.core.types import ModelId, Task
from edge.dispatch.destination import Destination
from edge.dispatch.worker import DeliveryWorker
from edge.jobs import queries
from edge.jobs.ledger import InstanceRecord, InstanceState, Ledger, RunState, SeriesState
from edge.pipeline.accumulator import SeriesAccumulator
from edge.pipeline.cam_results import cam_results
from edge.pipeline.deliveries import DeliveryBook
from edge.pipeline.events import ResultEvent, ResultFeed, ResultState, nodule_findings
from edge.pipeline.metrics import PipelineMetrics
from edge.pipeline.series_results import (
    ModelRun,
    ResultFile,
    SourceInstance,
    fingerprint,
    iter_pipeline_results,
)
from edge.pipeline.slices import SliceStore
from edge.preprocess.volume import FrameGeometry, frame_geometries
from edge.routing.rules import Pipeline, Routing
from edge.routing.series import SeriesInfo
from edge.scheduler.manager import ModelManager
from edge.scheduler.model import ServedModel
from edge.writers.cam import CamOutput

LOG = logging.getLogger(__name__)
#: Runs a 2.5D model's outstanding slices at completion (series, model, every frame of the
#: series, (rows, columns) per instance) -> slices run:
#: :meth:`edge.pipeline.streaming.InstanceProcessor.complete_context`.
CompleteContext = Callable[[str, ServedModel, Sequence[FrameGeometry],
                            Mapping[str, tuple[int, int]]], int]


class SeriesFinalizer:
    """Finishes complete series (one at a time: the orchestrator runs it on one thread)."""

    def __init__(self, settings: Settings, ledger: Ledger, manager: ModelManager,
                 store: SliceStore, accumulator: SeriesAccumulator, results_dir: Path,
                 delivery: DeliveryWorker | None, metrics: PipelineMetrics, feed: ResultFeed,
                 book: DeliveryBook, route_series: Callable[[SeriesInfo], Routing],
                 complete_context: CompleteContext | None = None,
                 context_input: Callable[[str, ModelId, str], np.ndarray | None] | None = None,
                 ) -> None:
        self._settings = settings
        self._complete_context = complete_context
        self._context_input = context_input
        self._ledger = ledger
        self._manager = manager
        self._store = store
        self._accumulator = accumulator
        self._results_dir = results_dir
        self._delivery = delivery
        self._metrics = metrics
        self._feed = feed
        self._book = book
        self._route_series = route_series

    def finish(self, uid: str, routing: Routing | None, last_received_at: float) -> None:
        """Build, record and queue the results of every pipeline of the series.

        Raises: OSError, OutOfResourcesError, LedgerError.
        """
        records = self._ledger.series_instances(uid)
        sources = self._sources(uid, records)
        if routing is None and sources:
            routing = self._route_series(SeriesInfo.from_header(sources[0].header))
        self._ledger.set_series_state(uid, SeriesState.PROCESSING)
        failed = False

        def context_failed(pipeline: str, model: str, exc: Exception) -> None:
            nonlocal failed
            failed = True
            LOG.error("series %s, %s: %s: %s", uid, model, type(exc).__name__, exc)
            self._ledger.set_run_state(self._ledger.create_run(uid, pipeline, model),
                                       RunState.FAILED, f"{type(exc).__name__}: {exc}")

        for pipeline in routing.pipelines if routing is not None else ():
            runs = []
            for name in pipeline.models:
                try:
                    served = self._manager.get(name)
                except (ModelNotFoundError, ModelNotReadyError):
                    continue  # recorded per instance
                if served.sidecar is not None:
                    runs.append(ModelRun(served.id, served.sidecar))
                    self._run_context(uid, served, sources, pipeline.name, context_failed)
            covered = [s for s in sources if any(
                self._store.has(uid, r.model, s.sop_instance_uid, len(s.frames)) for r in runs)]
            fp = fingerprint(runs, [s.sop_instance_uid for s in covered])
            if not covered or queries.pipeline_done(self._ledger, uid, pipeline.name, fp):
                continue

            def model_failed(run: ModelRun, exc: Exception, name: str = pipeline.name) -> None:
                nonlocal failed
                failed = True
                LOG.error("series %s, %s: %s: %s", uid, run.model, type(exc).__name__, exc)
                run_id = self._ledger.create_run(uid, name, str(run.model))
                self._ledger.set_run_state(run_id, RunState.FAILED,
                                           f"{type(exc).__name__}: {exc}")

            study = records[0].identity.study_instance_uid
            run_id = self._ledger.create_run(uid, pipeline.name, _expected_models(pipeline, runs),
                                             fingerprint=fp)
            folder = self._results_dir / uid / pipeline.name
            results = cam_results(
                iter_pipeline_results(folder, self._store, uid, pipeline, runs, covered,
                                      model_failed, self._accumulator,
                                      lambda r: self._manager.get(r.model.name,
                                                                  r.model.version)),
                folder, {r.model.name: r for r in runs},
                lambda r: self._manager.get(r.model.name, r.model.version),
                {r.identity.sop_instance_uid: r.path for r in records},
                CamOutput(self._settings.pipeline.cam_output),
                self._settings.pipeline.cam_slices, self._settings.pipeline.deadline_s,
                model_failed, self._stacked_input(uid))
            try:
                events = [self._record(run_id, uid, study, pipeline, result, last_received_at)
                          for result in results]
            except Exception as exc:  # the series stays unfinished: rebuilt at next start
                self._ledger.set_run_state(run_id, RunState.FAILED,
                                           f"interrupted: {type(exc).__name__}: {exc}")
                raise
            if events and not pipeline.destinations:
                LOG.warning("series %s: no destination configured; results kept in %s", uid,
                            self._results_dir / uid)
            self._ledger.set_run_state(run_id, RunState.DONE,
                                       None if events else "no result objects written")
            for event in events:
                self._feed.publish(event)
        for record in records:
            if record.state is not InstanceState.DONE:
                self._ledger.set_instance_state(record.identity.sop_instance_uid,
                                                InstanceState.DONE)
        self._ledger.set_series_state(uid, SeriesState.FAILED if failed else SeriesState.DONE)

    def _run_context(self, uid: str, served: ServedModel, sources: list[SourceInstance],
                     pipeline: str, on_error: Callable[[str, str, Exception], None]) -> None:
        """A 2.5D model (``context_slices`` > 0): run the slices that could not run while
        the series streamed (the ends of the stack, slices whose neighbours were unproven) or
        whose neighbours changed, now that the volume order is final. A failure leaves those
        slices without output (the model then covers fewer instances) and fails the series."""
        sidecar = served.sidecar
        if self._complete_context is None or sidecar is None \
                or not sidecar.preprocess.context_slices \
                or int(sidecar.postprocess.get("dims", 2)) == 3:
            return
        frames = [f for s in sources for f in s.frames]
        shapes = {s.sop_instance_uid: (int(getattr(s.header, "Rows", 0) or 0),
                                       int(getattr(s.header, "Columns", 0) or 0))
                  for s in sources}
        try:
            ran = self._complete_context(uid, served, frames, shapes)
        except (MededgeError, ValueError, OSError) as exc:
            on_error(pipeline, str(served.id), exc)
            return
        if ran:
            LOG.info("series %s, %s: %d slice(s) run at completion (2.5D)", uid, served.id, ran)

    def _stacked_input(self, uid: str) -> Callable[[ModelRun, str], np.ndarray | None] | None:
        """A 2.5D model's stacked input of one slice of series ``uid`` (for its CAM)."""
        lookup = self._context_input
        if lookup is None:
            return None
        return lambda run, sop: (lookup(uid, run.model, sop)
                                 if run.sidecar.preprocess.context_slices else None)

    def _sources(self, uid: str, records: list[InstanceRecord]) -> list[SourceInstance]:
        """Each instance's header: kept by the workers, else read from the spool (headers
        only); an unreadable one is left out (its reason was recorded when processed)."""
        sources = []
        for record in records:
            sop = record.identity.sop_instance_uid
            kept = self._accumulator.header(uid, sop)
            if kept is not None:
                sources.append(SourceInstance(sop, kept.header, kept.frames))
                continue
            try:
                header = pydicom.dcmread(record.path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError, EOFError):
                continue
            sources.append(SourceInstance(sop, header, frame_geometries(header)))
        return sources

    def _record(self, run_id: int, uid: str, study: str, pipeline: Pipeline,
                result: ResultFile, last_received_at: float) -> ResultEvent:
        """Record one written result, queue it for every destination, and return its WRITTEN
        event (published once the run is done).

        Raises: OutOfResourcesError, LedgerError, ConfigError.
        """
        event = ResultEvent(study, uid, result.model.name, result.model.version, result.kind,
                            result.sop_instance_uid, ResultState.WRITTEN,
                            probability=result.probability, positive=result.positive,
                            volumes_ml=dict(result.volumes_ml),
                            nodules=nodule_findings(result.detection))
        with self._book.lock:  # an outcome waits until its delivery is registered
            result_id = self._ledger.add_result(run_id, result.kind, result.path,
                                                result.sop_instance_uid)
            self._metrics.results_written.labels(result.kind).inc()
            if self._delivery is None:
                return event
            for text in pipeline.destinations:
                delivery_id = self._delivery.enqueue(result_id, result.path,
                                                     Destination.parse(text))
                self._metrics.delivery_queued(delivery_id, last_received_at, result.kind)
                self._book.register(delivery_id, ResultEvent(
                    study, uid, event.model, event.version, event.kind, event.sop_instance_uid,
                    ResultState.WRITTEN, text, event.probability, event.positive,
                    event.volumes_ml, nodules=event.nodules))
        return event


def _expected_models(pipeline: Pipeline, runs: list[ModelRun]) -> str:
    """The models whose objects the run will hold (the run row is made before the objects
    are, so the SEG can be queued at once): segmenters (SEG, and the SR they own), then
    classifiers beyond the segmenters' count (their own SR), then detectors (their own SR).
    "-": none expected."""
    segmenters = [r for r in runs if r.sidecar.task is Task.SEGMENT]
    classifiers = [r for r in runs if r.sidecar.task is Task.CLASSIFY]
    owners = segmenters if {"seg", "sr"} & set(pipeline.outputs) else []
    if "sr" in pipeline.outputs:
        owners = owners + classifiers[len(segmenters):]
        owners = owners + [r for r in runs if r.sidecar.task is Task.DETECT]  # own SRs
    return ",".join(dict.fromkeys(str(r.model) for r in owners)) or "-"
