"""Result events as they happen, for subscribers (the gRPC ``WatchResults`` stream).

:class:`ResultFeed` is a small thread-safe publish/subscribe hub: the orchestrator publishes a
:class:`ResultEvent` when a result object is written and recorded, and again when a destination
accepted it (``delivered``) or gave up on it (``dead``). Each subscriber gets its own bounded
queue; a subscriber that does not keep up loses its oldest events (counted in ``dropped``)
rather than slowing the pipeline. Publishing never blocks and never raises.
"""

from __future__ import annotations

import enum
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from edge.postprocess.results import SeriesDetection


class ResultState(str, enum.Enum):
    WRITTEN = "written"  # fsync'd and recorded in the ledger, deliveries queued
    DELIVERED = "delivered"  # a destination accepted it
    DEAD = "dead"  # a destination refused it for good, or the retries ran out


@dataclass(frozen=True)
class NoduleFinding:
    """One detected nodule as the event stream reports it (small: no per-slice boxes)."""

    label: str
    score: float
    diameter_mm: float
    center_voxel: tuple[float, float, float]  # slice, row, column (volume order)
    center_mm: tuple[float, float, float] | None  # patient LPS
    sop_instance_uid: str  # the slice of its largest box
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 on that slice, pixels


def nodule_findings(detection: SeriesDetection | None) -> tuple[NoduleFinding, ...]:
    """The candidates of ``detection`` as :class:`NoduleFinding` (none without one)."""
    if detection is None:
        return ()
    out = []
    for c in detection.candidates:
        if not c.boxes:
            continue
        index, b = max(c.boxes, key=lambda item: (item[1].area, item[1].score))
        out.append(NoduleFinding(c.label, c.score, c.diameter_mm, c.center_voxel, c.center_mm,
                                 detection.slices[index].sop_instance_uid,
                                 (b.x0, b.y0, b.x1, b.y1)))
    return tuple(out)


@dataclass(frozen=True)
class ResultEvent:
    """One result object of a series changed state."""

    study_instance_uid: str
    series_instance_uid: str
    model: str
    version: int
    kind: str  # "seg", "sr" (a classification is reported in an SR)
    sop_instance_uid: str  # of the result object
    state: ResultState
    destination: str = ""  # AET@HOST:PORT for delivered / dead
    probability: float | None = None  # the series classification, when the SR carries one
    positive: bool | None = None
    volumes_ml: Mapping[str, float] = field(default_factory=dict)  # per segment label
    error: str = ""
    nodules: tuple[NoduleFinding, ...] = ()  # a detector's SR: one per 3D candidate


@dataclass(frozen=True)
class WatchFilter:
    """Which events a subscriber wants: empty fields match everything."""

    study_instance_uid: str = ""
    series_instance_uid: str = ""

    def matches(self, event: ResultEvent) -> bool:
        return (not self.study_instance_uid
                or self.study_instance_uid == event.study_instance_uid) and \
            (not self.series_instance_uid
             or self.series_instance_uid == event.series_instance_uid)


class Subscription:
    """A subscriber's queue; :meth:`get` waits for the next event, :meth:`close` ends it."""

    def __init__(self, feed: ResultFeed, where: WatchFilter, capacity: int) -> None:
        self.where = where
        self.dropped = 0
        self._feed = feed
        self._queue: queue.Queue[ResultEvent | None] = queue.Queue(capacity)
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def get(self, timeout: float | None = None) -> ResultEvent | None:
        """The next event; None when closed or after ``timeout`` seconds without one."""
        if self._closed.is_set() and self._queue.empty():
            return None
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Unsubscribe and wake a waiting :meth:`get`. Safe to call twice, from any thread."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._feed.unsubscribe(self)
        self._offer(None)

    def _offer(self, event: ResultEvent | None) -> None:
        while True:
            try:
                self._queue.put_nowait(event)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    continue

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ResultFeed:
    """The hub: :meth:`subscribe` and :meth:`publish`, from any thread."""

    def __init__(self, capacity: int = 1024) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._subscribers: list[Subscription] = []

    def subscribe(self, where: WatchFilter | None = None) -> Subscription:
        subscription = Subscription(self, where or WatchFilter(), self._capacity)
        with self._lock:
            self._subscribers.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            if subscription in self._subscribers:
                self._subscribers.remove(subscription)

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def publish(self, event: ResultEvent) -> None:
        with self._lock:
            targets = [s for s in self._subscribers if s.where.matches(event)]
        for subscription in targets:
            subscription._offer(event)
