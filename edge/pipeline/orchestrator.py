"""The orchestrator: streams each received instance through its models and finishes series.

Flow. The listener records an instance (through :class:`PipelineRecorder`, which wraps the
ledger) and the orchestrator queues it on a worker pool, off the association's thread. A worker
reads the header, routes the series (once, cached), and for each 2D model that applies decodes,
preprocesses and submits every frame to the scheduler (a C-STORE Priority of HIGH raises the
request's priority), keeping each output in the :class:`~edge.pipeline.slices.SliceStore`.
When the :class:`~edge.pipeline.tracker.SeriesTracker` says the series is complete, the
finalizer waits for its in-flight instances, aggregates, writes SEG/SR, records the run and its
results in the ledger and queues their deliveries (:mod:`edge.pipeline.series_results`). Each
result is published on :attr:`Orchestrator.feed` when written and when delivered (or dead).
:meth:`Orchestrator.submit_instance` takes a Part 10 file through the listener's durable path
(validate, spool with fsync, ledger, queue) for the gRPC submission.

Crash safety. An instance stays ``received`` in the ledger until its series' results are queued
for delivery (or a reason why it has none is recorded), so :meth:`Orchestrator.start` resumes
everything :meth:`Ledger.unfinished` lists. Per-slice outputs on disk are reused, and a
pipeline's series-level run, ``done`` in the ledger with the fingerprint of its models and
instances, stops a second queueing of the same results (the state is set after the deliveries
are queued). Per-slice outputs are pruned once every delivery of the series is done or dead;
:meth:`Orchestrator.maintain` (every ``maintenance_interval_s``) applies the spool's retention
and prunes what a crash left.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

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
from edge.core.types import InferenceRequest, InferenceResponse
from edge.dispatch.destination import Destination
from edge.dispatch.worker import DeliveryWorker
from edge.ingest import AssociationClosed, ReceivedInstance
from edge.ingest.listener import file_meta
from edge.ingest.part10 import read_part10
from edge.ingest.spool import Spool
from edge.ingest.statuses import Status, failure_status
from edge.jobs import queries
from edge.jobs.ledger import (
    DeliveryState,
    DeliveryUpdate,
    InstanceState,
    Ledger,
    RunState,
    SeriesState,
    cleanup,
)
from edge.pipeline.events import ResultEvent, ResultFeed, ResultState
from edge.pipeline.metrics import PipelineMetrics
from edge.pipeline.series_results import (
    ModelRun,
    PipelineResults,
    SourceInstance,
    build_pipeline_results,
    fingerprint,
)
from edge.pipeline.slices import SliceStore, slice_output
from edge.pipeline.tracker import Completion, SeriesTracker
from edge.postprocess.aggregate import threshold_for
from edge.preprocess.dicom_pixels import decode
from edge.preprocess.imaging import preprocess_image
from edge.preprocess.volume import frame_geometries
from edge.repository.sidecar import Applicability
from edge.routing.rules import Routing, route
from edge.routing.series import DimsePriority, SeriesInfo
from edge.scheduler.manager import ModelManager, ModelState
from edge.scheduler.model import ServedModel

LOG = logging.getLogger(__name__)
_QUEUE_FULL_BACKOFF_S = 0.01
#: How often :meth:`Orchestrator.maintain` runs (retention of the spool, slice pruning).
MAINTENANCE_INTERVAL_S = 300.0


@dataclass(frozen=True)
class SubmitOutcome:
    """The answer to one submitted Part 10 file: a C-STORE status (PS3.4 B.2.3)."""

    sop_instance_uid: str  # "" when it could not be read
    series_instance_uid: str
    study_instance_uid: str
    status: int
    message: str = ""
    duplicate: bool = False


@dataclass(frozen=True)
class InstanceTask:
    """One acknowledged instance to process."""

    sop_instance_uid: str
    series_instance_uid: str
    path: Path
    calling_ae: str
    received_at: float  # time.time()
    priority: int = DimsePriority.MEDIUM  # the C-STORE request's Priority


@dataclass
class _Series:
    routing: Routing | None = None
    pending: int = 0  # instances queued or in a worker
    finalizing: int = 0
    last_received_at: float = 0.0  # time.time() of the newest instance


def scheduler_priority(dimse: int, rule_priority: int, levels: int) -> int:
    """The scheduler level (1 highest, 0 the model's default) for a slice request."""
    if rule_priority:
        return rule_priority
    if dimse == DimsePriority.HIGH:
        return 1
    if dimse == DimsePriority.LOW and levels > 1:
        return levels
    return 0


class PipelineRecorder:
    """The listener's :class:`~edge.ingest.InstanceRecorder`: the ledger first, then the
    orchestrator is told (non-blocking)."""

    def __init__(self, ledger: Ledger, orchestrator: Orchestrator) -> None:
        self._ledger = ledger
        self._orchestrator = orchestrator

    def record_instance(self, instance: ReceivedInstance) -> bool:
        """Raises: OutOfResourcesError, LedgerError (from the ledger; nothing is queued)."""
        new = self._ledger.record_instance(instance)
        ident = instance.identity
        self._orchestrator.received(InstanceTask(
            ident.sop_instance_uid, ident.series_instance_uid, instance.path,
            instance.calling_ae, instance.received_at, instance.priority), new)
        return new


class Orchestrator:
    """Drives the DICOM path. Thread-safe; :meth:`start` before the listener, :meth:`stop`
    after it."""

    def __init__(self, settings: Settings, ledger: Ledger, manager: ModelManager,
                 delivery: DeliveryWorker | None = None, metrics: PipelineMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 maintenance_interval_s: float = MAINTENANCE_INTERVAL_S) -> None:
        """Raises: ConfigError (a default destination is not AET@HOST:PORT)."""
        cfg = settings.pipeline
        self.settings = settings
        self.ledger = ledger
        self.manager = manager
        self.delivery = delivery
        self.metrics = metrics if metrics is not None else PipelineMetrics()
        self.results_dir = cfg.results_dir or settings.server.data_dir / "results"
        self.store = SliceStore(self.results_dir)
        self.destinations = tuple(str(Destination.parse(d)) for d in cfg.destinations)
        for rule in settings.routing.rules:
            for text in rule.destinations:
                Destination.parse(text)
        self._clock = clock
        self._tracker = SeriesTracker(cfg.quiet_period_s, cfg.max_wait_s)
        self._cond = threading.Condition()
        self._series: dict[str, _Series] = {}
        self._stopping = False
        self._pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="pipeline")
        self._finalizer = ThreadPoolExecutor(1, thread_name_prefix="series-finalize")
        self._timer: threading.Thread | None = None
        self.feed = ResultFeed()
        self.spool: Spool | None = None
        self._maintenance_interval_s = maintenance_interval_s
        self._maintenance: threading.Thread | None = None
        self._stopped = threading.Event()
        self._events_lock = threading.Lock()
        self._awaiting: dict[int, ResultEvent] = {}  # delivery id -> its result's event
        self._open_deliveries: dict[str, set[int]] = {}  # series -> deliveries not finished

    @property
    def recorder(self) -> PipelineRecorder:
        return PipelineRecorder(self.ledger, self)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, spool: Spool | None = None) -> int:
        """Start the completion timer and resume what the ledger lists as unfinished; return
        the number of instances resumed. With the listener's ``spool`` (reconciled first, see
        :func:`edge.jobs.reconcile.reconcile`), :meth:`submit_instance` works and the periodic
        :meth:`maintain` runs.

        Raises:
            RuntimeError: already started.
            LedgerError: the ledger cannot be read.
        """
        if self._timer is not None:
            raise RuntimeError("Orchestrator already started")
        self.spool = spool
        self._timer = threading.Thread(target=self._timer_loop, name="series-timer", daemon=True)
        self._timer.start()
        if spool is not None:
            self._maintenance = threading.Thread(target=self._maintenance_loop,
                                                 name="pipeline-maintenance", daemon=True)
            self._maintenance.start()
        unfinished = self.ledger.unfinished()
        for record in unfinished:
            ident = record.identity
            self.received(InstanceTask(ident.sop_instance_uid, ident.series_instance_uid,
                                       record.path, record.calling_ae, record.received_at), True)
        with self._cond:
            now = self._clock()
            for uid in {r.identity.series_instance_uid for r in unfinished}:
                self._tracker.resumed(uid, now, self.settings.pipeline.resume_grace_s)
            self._cond.notify_all()
        if unfinished:
            LOG.info("resuming %d unfinished instances", len(unfinished))
        return len(unfinished)

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Let in-flight instances and series finish (up to ``drain_timeout_s``); what is left
        stays unfinished in the ledger and resumes at the next start."""
        deadline = time.monotonic() + drain_timeout_s
        with self._cond:
            self._cond.wait_for(lambda: all(s.pending == 0 for s in self._series.values()),
                                timeout=max(0.0, deadline - time.monotonic()))
            self._stopping = True
            self._cond.notify_all()
        self._stopped.set()
        if self._timer is not None:
            self._timer.join(timeout=5)
        if self._maintenance is not None:
            self._maintenance.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        # the series being finished completes (bounded); the queued ones resume at next start
        self._finalizer.shutdown(wait=True, cancel_futures=True)

    def idle(self) -> bool:
        """Nothing queued, open or being finished."""
        with self._cond:
            return self._idle()

    def _idle(self) -> bool:
        return not self._series

    def wait_idle(self, timeout: float) -> bool:
        """Block until :meth:`idle` (True) or ``timeout`` seconds passed (False)."""
        with self._cond:
            return self._cond.wait_for(self._idle, timeout)

    # -- events -------------------------------------------------------------------------------

    def received(self, task: InstanceTask, new: bool) -> None:
        """An instance was acknowledged (``new`` False: a repeat; it only keeps the series
        open). Never blocks for long: called on the association's thread."""
        with self._cond:
            self._tracker.instance(task.series_instance_uid, task.sop_instance_uid,
                                   self._clock())
            state = self._series.setdefault(task.series_instance_uid, _Series())
            state.last_received_at = max(state.last_received_at, task.received_at)
            if new and not self._stopping:
                state.pending += 1
                try:
                    self._pool.submit(self._process, task)
                except RuntimeError:  # the pool shut down: resumed at the next start
                    state.pending -= 1
            self._cond.notify_all()

    def on_release(self, closed: AssociationClosed) -> None:
        """The listener's release callback: start the quiet period of the series delivered."""
        with self._cond:
            now = self._clock()
            for uid in closed.series_instance_uids:
                self._tracker.released(uid, now)
            self._cond.notify_all()

    def delivery_outcome(self, update: DeliveryUpdate) -> None:
        """The delivery worker's callback: metrics, the result feed, slice pruning. Never
        raises (the worker's contract)."""
        self.metrics.delivery_outcome(update.delivery_id, str(update.state.value))
        if update.state not in (DeliveryState.DONE, DeliveryState.DEAD):
            return
        with self._events_lock:  # held by _record_results while it enqueues and registers
            event = self._awaiting.pop(update.delivery_id, None)
            if event is None:
                return  # queued before this start: nobody can be watching it
            waiting = self._open_deliveries.get(event.series_instance_uid, set())
            waiting.discard(update.delivery_id)
            finished = not waiting
            if finished:
                self._open_deliveries.pop(event.series_instance_uid, None)
        delivered = update.state is DeliveryState.DONE
        self.feed.publish(ResultEvent(
            event.study_instance_uid, event.series_instance_uid, event.model, event.version,
            event.kind, event.sop_instance_uid,
            ResultState.DELIVERED if delivered else ResultState.DEAD, event.destination,
            event.probability, event.positive, event.volumes_ml, update.error or ""))
        if finished:
            self.prune_slices(event.series_instance_uid)

    # -- submission (gRPC) and maintenance ------------------------------------------------------

    def submit_instance(self, data: bytes | memoryview, calling_ae: str,
                        priority: int = DimsePriority.MEDIUM) -> SubmitOutcome:
        """Take one Part 10 file through the C-STORE path: validate, spool (fsync), record in
        the ledger, queue. A success is only returned once the file is durable and recorded.
        Failures are returned as the C-STORE status the listener would send, with a message.

        Raises:
            RuntimeError: not started with a spool (the DICOM path is not running).
        """
        spool = self.spool
        if spool is None:
            raise RuntimeError("the DICOM path is not running (no spool)")
        uid = series = study = ""
        try:
            part = read_part10(data)
            ident = part.identity
            uid, series, study = (ident.sop_instance_uid, ident.series_instance_uid,
                                  ident.study_instance_uid)
            stored = spool.store(ident, file_meta(ident, calling_ae),
                                 memoryview(data)[part.dataset_offset:])
            new = self.recorder.record_instance(ReceivedInstance(
                ident, stored.path, stored.size, calling_ae, time.time(), priority))
        except Exception as exc:  # every failure becomes a status, in edge.ingest.statuses
            status = failure_status(exc, calling_ae, uid)
            return SubmitOutcome(uid, series, study, int(status), str(exc) or type(exc).__name__)
        return SubmitOutcome(uid, series, study, int(Status.SUCCESS),
                             "" if new else "already received", duplicate=not new)

    def prune_slices(self, series_instance_uid: str) -> bool:
        """Remove the series' per-slice outputs unless the series is being worked on; True if
        removed. They are only needed again if the series gains instances (then every slice
        is inferred again)."""
        with self._cond:
            if series_instance_uid in self._series:
                return False
        folder = self.store.root / series_instance_uid / "slices"
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            return False
        except OSError as exc:
            LOG.warning("series %s: cannot prune slice outputs: %s", series_instance_uid, exc)
            return False
        return True

    def maintain(self) -> None:
        """One maintenance pass: the spool's retention (:func:`edge.jobs.ledger.cleanup` with
        ``spool.retention_*``), then prune slice outputs of finished series whose deliveries
        are all done or dead (left by a crash before the last outcome).

        Raises: OutOfResourcesError, LedgerError.
        """
        cfg = self.settings.spool
        if self.spool is not None:
            report = cleanup(self.spool, self.ledger, cfg.retention_max_age_s,
                             cfg.retention_min_free_bytes)
            if report.removed:
                LOG.info("retention: removed %d instances (%d bytes)", report.removed,
                         report.freed_bytes)
        for folder in self.store.root.glob("*/slices"):
            uid = folder.parent.name
            with self._events_lock:
                waiting = uid in self._open_deliveries
            if waiting:
                continue
            try:
                record = queries.series(self.ledger, uid)
            except queries.SeriesNotFoundError:
                continue
            if record.state in (SeriesState.DONE, SeriesState.FAILED) and \
                    not queries.open_deliveries(self.ledger, uid):
                self.prune_slices(uid)

    def _maintenance_loop(self) -> None:
        while not self._stopped.wait(self._maintenance_interval_s):
            try:
                self.maintain()
            except MededgeError:  # a busy or full ledger: try again at the next pass
                LOG.exception("maintenance pass failed")

    # -- per instance (worker pool) -----------------------------------------------------------

    def _process(self, task: InstanceTask) -> None:
        outcome = "failed"
        try:
            outcome = self._process_instance(task)
        except Exception as exc:  # one bad instance must not stop the pool; its reason is kept
            LOG.exception("instance %s: processing failed", task.sop_instance_uid)
            try:
                self._record_reason(task, f"processing failed: {type(exc).__name__}: {exc}",
                                    failed=True)
            except MededgeError:  # the ledger itself fails: the instance stays unfinished
                LOG.exception("instance %s: cannot record the failure", task.sop_instance_uid)
        finally:
            self.metrics.instances_processed.labels(outcome).inc()
            with self._cond:
                state = self._series.get(task.series_instance_uid)
                if state is not None:
                    state.pending -= 1
                    self._forget_if_done(task.series_instance_uid)
                self._cond.notify_all()

    def _record_reason(self, task: InstanceTask, reason: str, failed: bool) -> None:
        """Record why an instance gets no result (a run with the reason) and finish it.

        Raises: OutOfResourcesError, LedgerError.
        """
        run = self.ledger.create_run(task.series_instance_uid,
                                     "failed" if failed else "skipped", "",
                                     task.sop_instance_uid)
        self.ledger.set_run_state(run, RunState.FAILED if failed else RunState.SKIPPED, reason)
        self.ledger.set_instance_state(task.sop_instance_uid, InstanceState.DONE)

    def _process_instance(self, task: InstanceTask) -> str:
        try:
            ds = pydicom.dcmread(task.path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            self._record_reason(task, f"unreadable: {exc}", failed=True)
            return "failed"
        info = SeriesInfo.from_header(ds, task.calling_ae, task.priority)
        if info.images_in_acquisition:
            with self._cond:
                self._tracker.expect(info.series_instance_uid, info.images_in_acquisition)
                self._cond.notify_all()
        routing = self._routing_for(info)
        if not routing.pipelines:
            self._record_reason(task, f"skipped: {routing.skipped}", failed=False)
            return "skipped"
        frames = len(frame_geometries(ds))
        decoded = None
        problems: list[str] = []
        done = 0
        for pipeline in routing.pipelines:
            for name in pipeline.models:
                try:
                    served = self.manager.get(name)
                except (ModelNotFoundError, ModelNotReadyError) as exc:
                    problems.append(f"{name}: {exc}")
                    continue
                if served.sidecar is None:
                    problems.append(f"{name}: no sidecar (task, preprocessing unknown)")
                    continue
                if self.store.has(task.series_instance_uid, served.id, task.sop_instance_uid,
                                  frames):
                    done += 1
                    continue
                if decoded is None:
                    try:
                        decoded = decode(ds, task.sop_instance_uid)
                    except DataError as exc:
                        self._record_reason(task, f"decode failure: {exc}", failed=True)
                        return "failed"
                try:
                    self._infer(task, served, decoded.frames, decoded.meta, pipeline.priority,
                                info.priority)
                    done += 1
                except (MededgeError, ValueError) as exc:
                    problems.append(f"{name}: {type(exc).__name__}: {exc}")
        if problems:
            LOG.warning("instance %s: %s", task.sop_instance_uid, "; ".join(problems))
            if not done:
                self._record_reason(task, "; ".join(problems), failed=True)
                return "failed"
        return "inferred"

    def _infer(self, task: InstanceTask, served: ServedModel, frames: np.ndarray,
               meta: object, rule_priority: int, dimse: int) -> None:
        """Infer every frame of one instance with one model; keep the outputs.

        Raises: MededgeError (scheduler, backend, deadline), ValueError (shapes), OSError.
        """
        sidecar = served.sidecar
        assert sidecar is not None
        spec = sidecar.preprocess
        input_spec = served.inputs[0]
        output = str(sidecar.postprocess.get("output") or served.outputs[0].name)
        levels = int(served.config.dynamic_batching.priority_levels)
        priority = scheduler_priority(dimse, rule_priority, levels)
        threshold = threshold_for(sidecar.thresholds, sidecar.labels[-1])
        for index, frame in enumerate(frames):
            x = preprocess_image(frame, meta, spec)[np.newaxis]  # type: ignore[arg-type]
            response = self._submit(served, {input_spec.name: x.astype(input_spec.dtype)},
                                    priority, task.sop_instance_uid)
            value = slice_output(sidecar.task, response.outputs[output][0], threshold)
            self.store.save(task.series_instance_uid, served.id, task.sop_instance_uid,
                            index + 1, value)

    def _submit(self, served: ServedModel, inputs: Mapping[str, np.ndarray], priority: int,
                request_id: str) -> InferenceResponse:
        """Submit and wait; a full queue is backpressure: wait and retry until the deadline.

        Raises: QueueFullError, DeadlineExceededError, BackendError, InvalidInputError.
        """
        deadline = time.monotonic() + self.settings.pipeline.deadline_s
        while True:
            try:
                future = served.submit(InferenceRequest(
                    model=served.id.name, version=served.id.version, inputs=inputs,
                    request_id=request_id, priority=priority, deadline=deadline))
            except QueueFullError:
                if time.monotonic() >= deadline or self._stopping:
                    raise
                time.sleep(_QUEUE_FULL_BACKOFF_S)
                continue
            return future.result()

    def _applicability(self) -> dict[str, Applicability | None]:
        out: dict[str, Applicability | None] = {}
        for entry in self.manager.index():
            if entry.state is not ModelState.READY or entry.name in out:
                continue
            try:
                sidecar = self.manager.get(entry.name).sidecar
            except (ModelNotFoundError, ModelNotReadyError):
                continue
            out[entry.name] = sidecar.applicability if sidecar is not None else None
        return out

    def _routing_for(self, info: SeriesInfo) -> Routing:
        with self._cond:
            state = self._series.get(info.series_instance_uid)
            if state is not None and state.routing is not None:
                return state.routing
        routing = route(info, self.settings.routing, self._applicability(), self.destinations)
        with self._cond:
            state = self._series.setdefault(info.series_instance_uid, _Series())
            if state.routing is None:
                state.routing = routing
                if routing.pipelines:
                    LOG.info("series %s: %s", info.series_instance_uid, ", ".join(
                        f"{p.name}={'+'.join(p.models)}" for p in routing.pipelines))
                else:
                    LOG.info("series %s skipped: %s", info.series_instance_uid, routing.skipped)
            return state.routing

    # -- series completion --------------------------------------------------------------------

    def _timer_loop(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                now = self._clock()
                due = self._tracker.due(now)
                if not due:
                    nxt = self._tracker.next_deadline()
                    self._cond.wait(1.0 if nxt is None else min(1.0, max(0.0, nxt - now)))
                    continue
                for completion in due:
                    self._series.setdefault(completion.series_instance_uid,
                                            _Series()).finalizing += 1
            for completion in due:
                try:
                    self._finalizer.submit(self._finalize, completion)
                except RuntimeError:  # shutting down: resumed at the next start
                    self._finalized(completion.series_instance_uid)

    def _finalized(self, uid: str) -> None:
        with self._cond:
            state = self._series.get(uid)
            if state is not None:
                state.finalizing -= 1
                self._forget_if_done(uid)
            self._cond.notify_all()

    def _forget_if_done(self, uid: str) -> None:
        state = self._series.get(uid)
        if state is not None and not state.pending and not state.finalizing \
                and not self._tracker.is_open(uid):
            del self._series[uid]

    def _finalize(self, completion: Completion) -> None:
        uid = completion.series_instance_uid
        try:
            with self._cond:
                self._cond.wait_for(lambda: self._series[uid].pending == 0 or self._stopping,
                                    timeout=self.settings.pipeline.deadline_s)
                if self._stopping:
                    return
                state = self._series[uid]
                routing, last_received_at = state.routing, state.last_received_at
            self.metrics.series_completed.labels(completion.reason.value).inc()
            LOG.info("series %s complete (%s, %d instances)", uid, completion.reason.value,
                     completion.instances)
            self._finish_series(uid, routing, last_received_at)
        except Exception:  # the series stays unfinished in the ledger: resumed at next start
            LOG.exception("series %s: finishing failed", uid)
        finally:
            self._finalized(uid)

    def _finish_series(self, uid: str, routing: Routing | None, last_received_at: float) -> None:
        """Raises: OSError, OutOfResourcesError, LedgerError."""
        records = self.ledger.series_instances(uid)
        sources: list[SourceInstance] = []
        for record in records:
            try:
                header = pydicom.dcmread(record.path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError, EOFError):
                continue  # its reason was recorded when it was processed
            sources.append(SourceInstance(record.identity.sop_instance_uid, header,
                                          frame_geometries(header)))
        if routing is None and sources:
            info = SeriesInfo.from_header(sources[0].header)
            routing = route(info, self.settings.routing, self._applicability(),
                            self.destinations)
        self.ledger.set_series_state(uid, SeriesState.PROCESSING)
        failed = False
        for pipeline in routing.pipelines if routing is not None else ():
            runs = []
            for name in pipeline.models:
                try:
                    served = self.manager.get(name)
                except (ModelNotFoundError, ModelNotReadyError):
                    continue  # recorded per instance
                if served.sidecar is not None:
                    runs.append(ModelRun(served.id, served.sidecar))
            covered = [s for s in sources if any(
                self.store.has(uid, r.model, s.sop_instance_uid, len(s.frames)) for r in runs)]
            folder = self.results_dir / uid / pipeline.name
            if not covered or queries.pipeline_done(
                    self.ledger, uid, pipeline.name,
                    fingerprint(runs, [s.sop_instance_uid for s in covered])):
                continue

            def model_failed(run: ModelRun, exc: Exception, name: str = pipeline.name) -> None:
                nonlocal failed
                failed = True
                LOG.error("series %s, %s: %s: %s", uid, run.model, type(exc).__name__, exc)
                run_id = self.ledger.create_run(uid, name, str(run.model))
                self.ledger.set_run_state(run_id, RunState.FAILED,
                                          f"{type(exc).__name__}: {exc}")

            results = build_pipeline_results(folder, self.store, uid, pipeline, runs, covered,
                                             model_failed)
            self._record_results(uid, records[0].identity.study_instance_uid, results,
                                 last_received_at)
        for record in records:
            if record.state is not InstanceState.DONE:
                self.ledger.set_instance_state(record.identity.sop_instance_uid,
                                               InstanceState.DONE)
        self.ledger.set_series_state(uid, SeriesState.FAILED if failed else SeriesState.DONE)

    def _record_results(self, uid: str, study: str, results: PipelineResults,
                        last_received_at: float) -> None:
        """Record the run (with the results' fingerprint) and its results, queue each for every
        destination, publish them; the run becomes ``done`` last, which is what makes
        finishing the same instances again a no-op (:func:`edge.jobs.queries.pipeline_done`).

        Raises: OutOfResourcesError, LedgerError, ConfigError.
        """
        pipeline = results.pipeline
        models = ",".join(dict.fromkeys(str(f.model) for f in results.files))
        run_id = self.ledger.create_run(uid, pipeline.name, models or "-",
                                        fingerprint=results.fingerprint)
        events = []
        with self._events_lock:  # an outcome waits until its delivery is registered here
            for result in results.files:
                result_id = self.ledger.add_result(run_id, result.kind, result.path,
                                                   result.sop_instance_uid)
                self.metrics.results_written.labels(result.kind).inc()
                event = ResultEvent(study, uid, result.model.name, result.model.version,
                                    result.kind, result.sop_instance_uid, ResultState.WRITTEN,
                                    probability=result.probability, positive=result.positive,
                                    volumes_ml=dict(result.volumes_ml))
                events.append(event)
                if self.delivery is None:
                    continue
                for text in pipeline.destinations:
                    delivery_id = self.delivery.enqueue(result_id, result.path,
                                                        Destination.parse(text))
                    self.metrics.delivery_queued(delivery_id, last_received_at, result.kind)
                    self._awaiting[delivery_id] = ResultEvent(
                        study, uid, event.model, event.version, event.kind,
                        event.sop_instance_uid, ResultState.WRITTEN, text, event.probability,
                        event.positive, event.volumes_ml)
                    self._open_deliveries.setdefault(uid, set()).add(delivery_id)
        if results.files and not pipeline.destinations:
            LOG.warning("series %s: no destination configured; results kept in %s", uid,
                        self.results_dir / uid)
        self.ledger.set_run_state(run_id, RunState.DONE,
                                  None if results.files else "no result objects written")
        for event in events:
            self.feed.publish(event)
