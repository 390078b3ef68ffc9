"""When to try a delivery again, and whether to: the retry policy and the one status classifier.

C-STORE response statuses are those of PS3.4 Section B.2.3 (Table B.2-1) and the general ones
of PS3.7 Annex C. A-ASSOCIATE-RJ and A-ABORT are PS3.8 Section 9.3. Conditions with no DIMSE
status (no association, a local file that cannot be read, no accepted presentation context) are
given the negative :class:`LocalStatus` codes so that every outcome is one ``int``.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass

from edge.core.config import DispatchSettings


class LocalStatus(enum.IntEnum):
    """Outcomes with no DIMSE status from the peer (never sent on the wire)."""

    NO_ASSOCIATION = -1  # refused connection, timeout, A-ASSOCIATE-RJ, A-ABORT, no response
    UNREADABLE_FILE = -2  # the file to send is missing or has no usable file meta
    NO_CONTEXT = -3  # the peer accepted no presentation context for the file's SOP class/syntax


class Verdict(str, enum.Enum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"  # try again later
    PERMANENT = "permanent"  # dead letter now


#: Warnings (PS3.4 B.2.3): the instance was stored.
_WARNINGS = frozenset({0x0001, 0xB000, 0xB006, 0xB007})
#: PS3.7 Annex C failures that will not change by retrying.
_PERMANENT = frozenset({
    0x0117,  # invalid SOP instance
    0x0122,  # SOP class not supported
    0x0124,  # refused: not authorized
    0x0210,  # duplicate invocation
    0x0211,  # unrecognized operation
    0x0212,  # mistyped argument
})


def classify(status: int) -> Verdict:
    """What a C-STORE status (or a :class:`LocalStatus`) means for the delivery.

    Delivered: 0000 and the B-warnings. Transient: no association, A7xx (out of resources),
    0110 (processing failure), 0213 (resource limitation) and any status not known to be
    final. Permanent: A9xx (data set does not match SOP class), Cxxx (cannot understand),
    0122 (SOP class not supported), the other PS3.7 C failures in ``_PERMANENT``, an
    unreadable file, no accepted presentation context.
    """
    if status == 0x0000 or status in _WARNINGS:
        return Verdict.DELIVERED
    if status in (LocalStatus.UNREADABLE_FILE, LocalStatus.NO_CONTEXT) or status in _PERMANENT:
        return Verdict.PERMANENT
    if status >= 0 and (status & 0xFF00 == 0xA900 or status & 0xF000 == 0xC000):
        return Verdict.PERMANENT
    return Verdict.TRANSIENT


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: attempt ``n`` (1-based) failed -> wait
    ``min(max_s, initial_s * factor**(n-1))``, shortened by up to ``jitter`` of itself.

    ``max_attempts`` counts every try, the first included; after it the delivery is dead.
    """

    initial_s: float = 5.0
    factor: float = 2.0
    max_s: float = 600.0
    max_attempts: int = 20
    jitter: float = 0.2

    def __post_init__(self) -> None:
        """Raises: ValueError for a non-positive delay or attempt count, factor < 1, or
        jitter outside [0, 1]."""
        if self.initial_s <= 0 or self.max_s <= 0 or self.max_attempts < 1:
            raise ValueError(f"{self}: delays and max_attempts must be positive")
        if self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError(f"{self}: factor must be >= 1 and jitter in [0, 1]")

    @classmethod
    def from_settings(cls, settings: DispatchSettings) -> RetryPolicy:
        return cls(settings.retry_initial_s, settings.retry_factor, settings.retry_max_s,
                   settings.retry_max_attempts, settings.retry_jitter)

    def next_delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based). Deterministic
        when ``jitter`` is 0 (``rand`` is then not called).

        Raises:
            ValueError: ``attempt`` < 1.
        """
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, not {attempt}")
        exponent = min(attempt - 1, 64)  # no float overflow for absurd attempt counts
        delay = min(self.max_s, self.initial_s * self.factor**exponent)
        if self.jitter:
            delay *= 1.0 - self.jitter * rand()
        return delay

    def exhausted(self, attempts: int) -> bool:
        """True when ``attempts`` tries were made and no more are allowed."""
        return attempts >= self.max_attempts
