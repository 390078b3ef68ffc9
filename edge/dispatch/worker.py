"""DeliveryWorker: sends queued results from the ledger, retries with backoff, dead-letters.

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
from pathlib import Path

from edge.core.errors import ConfigError
from edge.dispatch.destination import Destination
from edge.dispatch.retry import RetryPolicy, Verdict, classify
from edge.dispatch.sender import DicomSender, StoreOutcome
from edge.jobs.ledger import DeliveryRecord, DeliveryState, DeliveryUpdate, Ledger

LOG = logging.getLogger(__name__)

#: Longest idle wait between looks at the ledger (a safety net; enqueue and stop wake the thread).
_MAX_IDLE_S = 30.0
#: Wait after a round failed on the ledger itself.
_ERROR_WAIT_S = 5.0


class DeliveryWorker:
    """One background thread that delivers due rows of the ledger's ``deliveries`` table.

    Due deliveries to the same destination go in one association (up to ``max_batch`` files);
    destinations are served one after another, in due order.
    """

    def __init__(self, ledger: Ledger, sender: DicomSender, policy: RetryPolicy, *,
                 max_batch: int = 64, on_outcome: Callable[[DeliveryUpdate], None] | None = None
                 ) -> None:
        """``on_outcome`` is called after each recorded attempt (metrics); it must not raise."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, not {max_batch}")
        self.ledger = ledger
        self.sender = sender
        self.policy = policy
        self.max_batch = max_batch
        self._on_outcome = on_outcome
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

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
        self._wake.set()
        return delivery_id

    def start(self) -> None:
        """Resume: interrupted attempts become due now, then the thread starts.

        Raises:
            RuntimeError: already started.
            OutOfResourcesError, LedgerError: the ledger cannot be written.
        """
        if self._thread is not None:
            raise RuntimeError("DeliveryWorker already started")
        resumed = self.ledger.requeue_interrupted_deliveries("interrupted: sent again")
        if resumed:
            LOG.warning("resuming %d interrupted deliveries", resumed)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="delivery-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop after the association in progress, if any (bounded by the sender's timeouts).
        Whatever is not delivered stays in the ledger for the next start."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def __enter__(self) -> DeliveryWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                if self.deliver_due():
                    continue
                due = self.ledger.next_delivery_due()
                wait = _MAX_IDLE_S if due is None else min(_MAX_IDLE_S, due - time.time())
            except Exception:  # a failing ledger (full disk) must not kill the thread
                LOG.exception("delivery round failed; trying again in %.0f s", _ERROR_WAIT_S)
                wait = _ERROR_WAIT_S
            if wait > 0:
                self._wake.wait(wait)

    def deliver_due(self) -> bool:
        """Make one attempt at the due deliveries of one destination; False if none was due.

        Raises:
            OutOfResourcesError, LedgerError: the ledger cannot be read or written.
        """
        due = self.ledger.due_deliveries(time.time(), limit=10 * self.max_batch)
        if not due:
            return False
        target = due[0].destination
        batch = [d for d in due if d.destination == target][: self.max_batch]
        try:
            destination = Destination.parse(target)
        except ConfigError as exc:  # a row not written by enqueue(): it can never be sent
            updates = [DeliveryUpdate(d.delivery_id, DeliveryState.DEAD, str(exc)) for d in batch]
        else:
            self.ledger.mark_deliveries_sending([d.delivery_id for d in batch])
            outcomes = self.sender.send([d.path for d in batch], destination)
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
