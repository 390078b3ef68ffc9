"""Plain thread-safe counters the listener updates; the API layer exposes them to Prometheus."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class IngestSnapshot:
    """A consistent copy of the counters at one instant."""

    associations_accepted: int = 0
    associations_rejected: Mapping[str, int] = field(default_factory=dict)  # by reason label
    instances_received: int = 0  # newly stored
    instances_duplicate: int = 0  # already stored: success, nothing rewritten
    bytes_received: int = 0  # datasets answered with success, duplicates included
    stores_failed: Mapping[int, int] = field(default_factory=dict)  # by DIMSE status


class IngestStats:
    """Counters for the DICOM listener. Every method is safe to call from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accepted = 0
        self._rejected: Counter[str] = Counter()
        self._received = 0
        self._duplicate = 0
        self._bytes = 0
        self._failed: Counter[int] = Counter()

    def association_accepted(self) -> None:
        with self._lock:
            self._accepted += 1

    def association_rejected(self, reason: str) -> None:
        with self._lock:
            self._rejected[reason] += 1

    def instance_stored(self, size: int, duplicate: bool) -> None:
        with self._lock:
            self._bytes += size
            if duplicate:
                self._duplicate += 1
            else:
                self._received += 1

    def store_failed(self, status: int) -> None:
        with self._lock:
            self._failed[int(status)] += 1

    def snapshot(self) -> IngestSnapshot:
        with self._lock:
            return IngestSnapshot(self._accepted, dict(self._rejected), self._received,
                                  self._duplicate, self._bytes, dict(self._failed))
