"""The orchestrator: wires intake, streaming inference, series completion and finalize.

Flow. The listener records an instance (through :class:`~edge.pipeline.intake.PipelineRecorder`,
which wraps the ledger) and the orchestrator queues it on a worker pool, off the association's
thread; a worker runs :class:`~edge.pipeline.streaming.InstanceProcessor` (route once per series,
infer each frame, keep the outputs on disk and, restored to the source geometry, in the
:class:`~edge.pipeline.accumulator.SeriesAccumulator`). When the
:class:`~edge.pipeline.tracker.SeriesTracker` says the series is complete (expected count;
release + a short grace when the frames form a gap-free stack; release + quiet period; max
wait), the finalizer thread waits for its in-flight instances and runs
:class:`~edge.pipeline.finalize.SeriesFinalizer` (SEG queued for delivery before the SR is
built). Each result is published on :attr:`Orchestrator.feed` when written and when delivered
(or dead). :meth:`Orchestrator.submit_instance` is the gRPC submission's way in.

Crash safety. An instance stays ``received`` in the ledger until its series' results are queued
for delivery (or a reason why it has none is recorded), so :meth:`Orchestrator.start` resumes
everything :meth:`Ledger.unfinished` lists. Per-slice outputs on disk are reused, and a
pipeline's series-level run, ``done`` in the ledger with the fingerprint of its models and
instances, stops a second queueing of the same results. Per-slice outputs are pruned once every
delivery of the series is done or dead; :meth:`Orchestrator.maintain` (every
``maintenance_interval_s``) applies the spool's retention and prunes what a crash left.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from edge.core.config import Settings
from edge.core.errors import MededgeError, ModelNotFoundError, ModelNotReadyError
from edge.dispatch.destination import Destination
from edge.dispatch.worker import DeliveryWorker
from edge.ingest import AssociationClosed
from edge.ingest.spool import Spool
from edge.jobs.ledger import DeliveryState, DeliveryUpdate, Ledger
from edge.pipeline.accumulator import SeriesAccumulator, contiguous_stack
from edge.pipeline.deliveries import DeliveryBook
from edge.pipeline.events import ResultEvent, ResultFeed, ResultState
from edge.pipeline.finalize import SeriesFinalizer
from edge.pipeline.intake import InstanceTask, PipelineRecorder, SubmitOutcome, submit_part10
from edge.pipeline.maintenance import maintain, prune_slice_folder
from edge.pipeline.metrics import PipelineMetrics
from edge.pipeline.slices import SliceStore
from edge.pipeline.streaming import InstanceProcessor, record_reason, scheduler_priority
from edge.pipeline.tracker import Completion, SeriesTracker
from edge.repository.sidecar import Applicability
from edge.routing.rules import Routing, route
from edge.routing.series import DimsePriority, SeriesInfo
from edge.scheduler.manager import ModelManager, ModelState

LOG = logging.getLogger(__name__)
#: How often :meth:`Orchestrator.maintain` runs (retention of the spool, slice pruning).
MAINTENANCE_INTERVAL_S = 300.0
#: After a release, a series whose frames form a gap-free stack completes this long after its
#: last instance (at most the quiet period): long enough for a sender that opens its next
#: association at once, short against the quiet period a stack with gaps still waits.
RELEASE_GRACE_S = 0.25

__all__ = ["MAINTENANCE_INTERVAL_S", "RELEASE_GRACE_S", "InstanceTask", "Orchestrator",
           "PipelineRecorder", "SubmitOutcome", "scheduler_priority"]


@dataclass
class _Series:
    routing: Routing | None = None
    pending: int = 0  # instances queued or in a worker
    finalizing: int = 0
    last_received_at: float = 0.0  # time.time() of the newest instance


class Orchestrator:
    """Drives the DICOM path. Thread-safe; :meth:`start` before the listener, :meth:`stop`
    after it."""

    def __init__(self, settings: Settings, ledger: Ledger, manager: ModelManager,
                 delivery: DeliveryWorker | None = None, metrics: PipelineMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 maintenance_interval_s: float = MAINTENANCE_INTERVAL_S,
                 release_grace_s: float = RELEASE_GRACE_S) -> None:
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
        self._tracker = SeriesTracker(cfg.quiet_period_s, cfg.max_wait_s, release_grace_s)
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
        self._book = DeliveryBook()
        self._accumulator = SeriesAccumulator()
        self._processor = InstanceProcessor(settings, ledger, manager, self.store,
                                            self._accumulator, self._routing_for, self._expect,
                                            lambda: self._stopping)
        self._finish = SeriesFinalizer(settings, ledger, manager, self.store, self._accumulator,
                                       self.results_dir, delivery, self.metrics, self.feed,
                                       self._book, self._route,
                                       self._processor.complete_context,
                                       self._processor.context_input)

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
        """The listener's release callback: start the quiet period of the series delivered
        (a short grace once their frames are known to form a gap-free stack)."""
        idle = []
        with self._cond:
            now = self._clock()
            for uid in closed.series_instance_uids:
                self._tracker.released(uid, now)
                state = self._series.get(uid)
                if state is not None and state.pending == 0:
                    idle.append(uid)
            self._cond.notify_all()
        for uid in idle:  # the ledger is read off the association's thread
            with contextlib.suppress(RuntimeError):  # the pool shut down: nothing to finish
                self._pool.submit(self._check_stack, uid)

    def delivery_outcome(self, update: DeliveryUpdate) -> None:
        """The delivery worker's callback: metrics, the result feed, slice pruning. Never
        raises (the worker's contract)."""
        self.metrics.delivery_outcome(update.delivery_id, str(update.state.value))
        if update.state not in (DeliveryState.DONE, DeliveryState.DEAD):
            return
        settled = self._book.settle(update.delivery_id)
        if settled is None:
            return  # queued before this start: nobody can be watching it
        event = settled.event
        delivered = update.state is DeliveryState.DONE
        self.feed.publish(ResultEvent(
            event.study_instance_uid, event.series_instance_uid, event.model, event.version,
            event.kind, event.sop_instance_uid,
            ResultState.DELIVERED if delivered else ResultState.DEAD, event.destination,
            event.probability, event.positive, event.volumes_ml, update.error or ""))
        if settled.series_finished:
            self.prune_slices(event.series_instance_uid)

    # -- submission (gRPC) and maintenance ------------------------------------------------------

    def submit_instance(self, data: bytes | memoryview, calling_ae: str,
                        priority: int = DimsePriority.MEDIUM) -> SubmitOutcome:
        """Take one Part 10 file through the C-STORE path (:func:`~edge.pipeline.intake.
        submit_part10`): a success only once the file is durable and recorded; failures as the
        C-STORE status the listener would send, with a message.

        Raises:
            RuntimeError: not started with a spool (the DICOM path is not running).
        """
        if self.spool is None:
            raise RuntimeError("the DICOM path is not running (no spool)")
        return submit_part10(self.spool, self.recorder, data, calling_ae, priority)

    def prune_slices(self, series_instance_uid: str) -> bool:
        """Remove the series' per-slice outputs unless the series is being worked on; True if
        removed. They are only needed again if the series gains instances (then every slice
        is inferred again)."""
        with self._cond:
            if series_instance_uid in self._series:
                return False
        return prune_slice_folder(self.store, series_instance_uid)

    def maintain(self) -> None:
        """One maintenance pass (:func:`edge.pipeline.maintenance.maintain`).

        Raises: OutOfResourcesError, LedgerError.
        """
        maintain(self.spool, self.ledger, self.store, self.settings.spool, self._book.has_open,
                 self.prune_slices)

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
            outcome = self._processor.process(task)
        except Exception as exc:  # one bad instance must not stop the pool; its reason is kept
            LOG.exception("instance %s: processing failed", task.sop_instance_uid)
            try:
                record_reason(self.ledger, task,
                              f"processing failed: {type(exc).__name__}: {exc}", failed=True)
            except MededgeError:  # the ledger itself fails: the instance stays unfinished
                LOG.exception("instance %s: cannot record the failure", task.sop_instance_uid)
        finally:
            self.metrics.instances_processed.labels(outcome).inc()
            uid = task.series_instance_uid
            with self._cond:
                state = self._series.get(uid)
                check = False
                if state is not None:
                    state.pending -= 1
                    check = state.pending == 0 and self._tracker.is_released(uid)
                    self._forget_if_done(uid)
                self._cond.notify_all()
            if check:
                self._check_stack(uid)

    def _check_stack(self, uid: str) -> None:
        """Tell the tracker when every instance the ledger has of the series is known here and
        their frames form one gap-free stack (then a release completes it after the grace)."""
        with self._cond:
            count = self._tracker.instances(uid)
        if not count:
            return
        try:
            records = self.ledger.series_instances(uid)
        except MededgeError:
            LOG.exception("series %s: cannot read its instances", uid)
            return
        frames = self._accumulator.frames(uid, [r.identity.sop_instance_uid for r in records])
        if frames is None or not contiguous_stack(frames):
            return
        with self._cond:
            if self._tracker.stack_complete(uid, count):
                self._cond.notify_all()

    def _expect(self, uid: str, expected: int) -> None:
        with self._cond:
            self._tracker.expect(uid, expected)
            self._cond.notify_all()

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

    def _route(self, info: SeriesInfo) -> Routing:
        return route(info, self.settings.routing, self._applicability(), self.destinations)

    def _routing_for(self, info: SeriesInfo) -> Routing:
        with self._cond:
            state = self._series.get(info.series_instance_uid)
            if state is not None and state.routing is not None:
                return state.routing
        routing = self._route(info)
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
            self._accumulator.drop(uid)
            self._processor.forget_series(uid)

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
            started = time.monotonic()
            self._finish.finish(uid, routing, last_received_at)
            LOG.info("series %s finished in %.3f s", uid, time.monotonic() - started)
        except Exception:  # the series stays unfinished in the ledger: resumed at next start
            LOG.exception("series %s: finishing failed", uid)
        finally:
            self._finalized(uid)
