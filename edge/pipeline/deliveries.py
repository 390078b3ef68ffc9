"""Which queued deliveries this process is waiting for, and the result event each belongs to.

The finalizer registers a delivery while it enqueues it (under :attr:`DeliveryBook.lock`, so an
outcome that comes back at once finds it); the delivery worker's outcome callback takes it out.
When the last open delivery of a series is done or dead its slice outputs can be pruned.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from edge.pipeline.events import ResultEvent


@dataclass(frozen=True)
class Settled:
    """A registered delivery reached ``done`` or ``dead``."""

    event: ResultEvent  # the result's WRITTEN event, with the destination
    series_finished: bool  # no other delivery of the series is open


class DeliveryBook:
    """Delivery id -> its result's event; series -> its open deliveries. Thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # held by the finalizer while it enqueues and registers
        self._awaiting: dict[int, ResultEvent] = {}
        self._open: dict[str, set[int]] = {}

    def register(self, delivery_id: int, event: ResultEvent) -> None:
        """Call with :attr:`lock` held."""
        self._awaiting[delivery_id] = event
        self._open.setdefault(event.series_instance_uid, set()).add(delivery_id)

    def settle(self, delivery_id: int) -> Settled | None:
        """Forget a finished delivery; None when it was not registered in this process."""
        with self.lock:
            event = self._awaiting.pop(delivery_id, None)
            if event is None:
                return None
            waiting = self._open.get(event.series_instance_uid, set())
            waiting.discard(delivery_id)
            finished = not waiting
            if finished:
                self._open.pop(event.series_instance_uid, None)
        return Settled(event, finished)

    def has_open(self, series_instance_uid: str) -> bool:
        with self.lock:
            return series_instance_uid in self._open
