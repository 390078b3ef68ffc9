"""DeliveryWorker: sends queued results from the ledger, one thread per destination, retries
with backoff, dead-letters.

Durable by construction: :meth:`DeliveryWorker.enqueue` writes the delivery row (pending) before
returning, each attempt is written before and after it is made, and the worker's only queue is
the ledger itself. A restarted worker therefore picks up everything not yet acknowledged by the
peer; a row found in ``sending`` was interrupted mid-attempt and is sent again (harmless: result
UIDs are deterministic, so the PACS replaces the instance).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edge.core.errors import ConfigError
from edge.dispatch.destination import Destination
from edge.dispatch.retry import RetryPolicy, Verdict, classify
from edge.dispatch.sender import DicomSender, StoreOutcome
from edge.jobs.ledger import DeliveryRecord, DeliveryState, DeliveryUpdate, Ledger

LOG = logging.getLogger(__name__)

#: Longest idle wait between looks at the ledger (a safety net; enqueue and stop wake a lane).
_MAX_IDLE_S = 30.0
#: Wait after a round failed on the ledger itself.
_ERROR_WAIT_S = 5.0


@dataclass
class _Lane:
    """The thread delivering to one destination, and the event that wakes it."""

    destination: str
    wake: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class DeliveryWorker:
    """Delivers the due rows of the ledger's ``deliveries`` table, one thread per destination.

    Each destination with pending or failed deliveries gets its own thread (a lane), so a
    PACS that is slow, down or dropping packets delays only its own results. At most
    ``max_destinations`` lanes run at once; further destinations wait for a lane to retire
    (a lane retires when its destination has nothing left to send). Due deliveries to one
    destination go in one association, up to ``max_batch`` files.
    """

    def __init__(self, ledger: Ledger, sender: DicomSender, policy: RetryPolicy, *,
                 max_batch: int = 64, max_destinations: int = 16,
                 on_outcome: Callable[[DeliveryUpdate], None] | None = None) -> None:
        """``sender`` is shared by the lanes (it is safe from several threads); ``on_outcome``
        is called after each recorded attempt (metrics), from the lanes' threads, so it must
        be thread-safe; it should not raise (an exception is logged and ignored).

        Raises:
            ValueError: ``max_batch`` or ``max_destinations`` is below 1.
        """
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, not {max_batch}")
        if max_destinations < 1:
            raise ValueError(f"max_destinations must be >= 1, not {max_destinations}")
        self.ledger = ledger
        self.sender = sender
        self.policy = policy
        self.max_batch = max_batch
        self.max_destinations = max_destinations
        self._on_outcome = on_outcome
        self._lock = threading.Lock()  # guards _lanes, _waiting, _running
        self._lanes: dict[str, _Lane] = {}
        self._waiting: list[str] = []  # destinations over the lane limit, first come first
        self._running = False
        self._stopping = threading.Event()

    def enqueue(self, result_id: int, path: Path, destination: Destination) -> int:
        """Queue ``path`` (the file of result ``result_id``) for ``destination``; return the
        delivery id. The row is committed before this returns.

        Raises:
            ValueError: the ledger has no such result, or records another file for it.
            OutOfResourcesError, LedgerError: the ledger cannot be written.
        """
        recorded = self.ledger.result_path(result_id)
        if recorded is None or recorded != Path(path):
            raise ValueError(f"result {result_id}: ledger has file {recorded}, not {path}")
        delivery_id = self.ledger.add_delivery(result_id, str(destination))
        self._ensure_lane(str(destination))
        return delivery_id

    def start(self) -> None:
        """Resume: interrupted attempts become due now, then a lane starts for each destination
        with something to send.

        Raises:
            RuntimeError: already started.
            OutOfResourcesError, LedgerError: the ledger cannot be read or written.
        """
        with self._lock:
            if self._running:
                raise RuntimeError("DeliveryWorker already started")
            self._running = True
            self._stopping.clear()
        try:
            resumed = self.ledger.requeue_interrupted_deliveries("interrupted: sent again")
            if resumed:
                LOG.warning("resuming %d interrupted deliveries", resumed)
            destinations = self.ledger.open_delivery_destinations()
        except BaseException:
            with self._lock:
                self._running = False
            raise
        for destination in destinations:
            self._ensure_lane(destination)

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop every lane after the association it has in progress, if any (bounded by the
        sender's timeouts); ``timeout_s`` bounds the whole wait. Whatever is not delivered
        stays in the ledger for the next start."""
        with self._lock:
            self._running = False
            self._stopping.set()
            lanes = list(self._lanes.values())
            self._lanes.clear()
            self._waiting.clear()
        for lane in lanes:
            lane.wake.set()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for lane in lanes:
            if lane.thread is not None:
                lane.thread.join(None if deadline is None
                                 else max(0.0, deadline - time.monotonic()))

    def destinations(self) -> tuple[str, ...]:
        """Destinations that have a lane now."""
        with self._lock:
            return tuple(self._lanes)

    def __enter__(self) -> DeliveryWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _ensure_lane(self, destination: str) -> None:
        """Wake the lane of ``destination``, start one, or queue it behind the limit."""
        with self._lock:
            if not self._running:
                return
            lane = self._lanes.get(destination)
            if lane is not None:
                lane.wake.set()
            elif len(self._lanes) >= self.max_destinations:
                if destination not in self._waiting:
                    LOG.warning("%d destinations busy: deliveries to %s wait for a free lane",
                                len(self._lanes), destination)
                    self._waiting.append(destination)
            else:
                self._start_lane(destination)

    def _start_lane(self, destination: str) -> None:
        """Called with the lock held."""
        lane = _Lane(destination)
        lane.thread = threading.Thread(target=self._run, args=(lane,), daemon=True,
                                       name=f"delivery:{destination}")
        self._lanes[destination] = lane
        lane.thread.start()

    def _retire(self, lane: _Lane) -> bool:
        """End ``lane`` if its destination has nothing left to send; start a waiting one.

        Checked under the lock: enqueue commits its row before it takes the lock, so either
        this sees the row or enqueue sees the lane gone and starts a new one.
        """
        with self._lock:
            if self._lanes.get(lane.destination) is not lane:
                return True  # stopped meanwhile
            if self.ledger.next_delivery_due(lane.destination) is not None:
                return False
            del self._lanes[lane.destination]
            if self._waiting and self._running:
                self._start_lane(self._waiting.pop(0))
            return True

    def _run(self, lane: _Lane) -> None:
        while not self._stopping.is_set():
            lane.wake.clear()
            try:
                if self.deliver_due(lane.destination):
                    continue
                due = self.ledger.next_delivery_due(lane.destination)
                if due is None and self._retire(lane):
                    return
                wait = _MAX_IDLE_S if due is None else min(_MAX_IDLE_S, due - time.time())
            except Exception:  # a failing ledger (full disk) must not kill the lane
                LOG.exception("delivery round for %s failed; trying again in %.0f s",
                              lane.destination, _ERROR_WAIT_S)
                wait = _ERROR_WAIT_S
            if wait > 0:
                lane.wake.wait(wait)

    def deliver_due(self, destination: str | None = None) -> bool:
        """Make one attempt at the due deliveries of ``destination`` (by default, of the
        destination due first); False if none was due.

        Raises:
            OutOfResourcesError, LedgerError: the ledger cannot be read or written.
        """
        due = self.ledger.due_deliveries(time.time(), limit=10 * self.max_batch,
                                         destination=destination)
        if not due:
            return False
        target = due[0].destination
        batch = [d for d in due if d.destination == target][: self.max_batch]
        try:
            parsed = Destination.parse(target)
        except ConfigError as exc:  # a row not written by enqueue(): it can never be sent
            updates = [DeliveryUpdate(d.delivery_id, DeliveryState.DEAD, str(exc)) for d in batch]
        else:
            self.ledger.mark_deliveries_sending([d.delivery_id for d in batch])
            outcomes = self.sender.send([d.path for d in batch], parsed)
            updates = [self._update(d, o) for d, o in zip(batch, outcomes, strict=True)]
        self.ledger.record_delivery_outcomes(updates)
        for update in updates:
            self._notify(update)
        return True

    def _notify(self, update: DeliveryUpdate) -> None:
        if self._on_outcome is None:
            return
        try:
            self._on_outcome(update)
        except Exception:  # an observer must not stop deliveries
            LOG.exception("delivery outcome callback failed")

    def _update(self, delivery: DeliveryRecord, outcome: StoreOutcome) -> DeliveryUpdate:
        attempts = delivery.attempts + 1  # counted by mark_deliveries_sending
        verdict = classify(outcome.status)
        if verdict is Verdict.DELIVERED:
            return DeliveryUpdate(delivery.delivery_id, DeliveryState.DONE, outcome.error or None)
        if verdict is Verdict.PERMANENT:
            LOG.error("delivery %d to %s dead: %s", delivery.delivery_id, delivery.destination,
                      outcome.error)
            return DeliveryUpdate(delivery.delivery_id, DeliveryState.DEAD, outcome.error)
        if self.policy.exhausted(attempts):
            LOG.error("delivery %d to %s dead after %d attempts: %s", delivery.delivery_id,
                      delivery.destination, attempts, outcome.error)
            return DeliveryUpdate(delivery.delivery_id, DeliveryState.DEAD,
                                  f"gave up after {attempts} attempts: {outcome.error}")
        delay = self.policy.next_delay(attempts)
        LOG.warning("delivery %d to %s failed (attempt %d, next in %.1f s): %s",
                    delivery.delivery_id, delivery.destination, attempts, delay, outcome.error)
        return DeliveryUpdate(delivery.delivery_id, DeliveryState.FAILED, outcome.error,
                              time.time() + delay)
