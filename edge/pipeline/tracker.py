"""Series completion: a pure state machine on a monotonic clock (no threads, no I/O).

A series is complete when the first of these holds:

- **expected count**: the data says how many instances to expect (ImagesInAcquisition) and that
  many have arrived;
- **release + grace on a complete stack**: an association that delivered instances of the
  series has ended and the caller said the frames received form one gap-free stack
  (:meth:`SeriesTracker.stack_complete`); no instance arrived for ``release_grace_s`` since;
- **release + quiet period**: an association that delivered instances of the series has ended
  (released or aborted) and no instance of it arrived for ``quiet_period_s`` since, which
  covers a modality that sends one series over several associations back to back;
- **maximum wait**: no instance arrived for ``max_wait_s`` though no association ended (a
  peer that keeps its association open for hours).

An instance arriving after completion opens a new *epoch* of the series: it is tracked afresh
and completes again (the results are rebuilt with the same deterministic UIDs, so the PACS gets
a replacement, not a duplicate).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class CompletionReason(str, enum.Enum):
    EXPECTED_COUNT = "expected_count"
    RELEASED = "released"  # association ended + quiet period
    MAX_WAIT = "max_wait"
    RESUMED = "resumed"  # found unfinished at start-up


@dataclass(frozen=True)
class Completion:
    """A series became complete."""

    series_instance_uid: str
    reason: CompletionReason
    instances: int  # seen in this epoch
    last_instance_at: float  # monotonic time of the last instance
    epoch: int  # 0 for the first completion, then 1, 2 ... for late arrivals


@dataclass
class _Series:
    epoch: int = 0
    count: int = 0
    expected: int | None = None
    last_at: float = 0.0
    released_at: float | None = None
    resumed: bool = False
    hold_until: float = 0.0  # a resumed series waits for its sender's retry until then
    stack_complete: bool = False  # the caller found a gap-free stack (reset by new instances)
    uids: set[str] = field(default_factory=set)


class SeriesTracker:
    """Tracks open series; call :meth:`due` with the current time to collect completions.

    Not thread-safe by itself: the orchestrator calls it under its own lock.
    """

    def __init__(self, quiet_period_s: float, max_wait_s: float,
                 release_grace_s: float | None = None) -> None:
        """``release_grace_s`` (None: the quiet period; never more than it) is the wait after
        a release when the stack is complete.

        Raises: ValueError (a negative period, ``max_wait_s`` not positive)."""
        if quiet_period_s < 0 or max_wait_s <= 0 or (release_grace_s or 0) < 0:
            raise ValueError("quiet_period_s, release_grace_s must be >= 0 and max_wait_s > 0")
        self.quiet_period_s = quiet_period_s
        self.release_grace_s = quiet_period_s if release_grace_s is None \
            else min(release_grace_s, quiet_period_s)
        self.max_wait_s = max_wait_s
        self._open: dict[str, _Series] = {}
        self._epochs: dict[str, int] = {}

    def instance(self, series_instance_uid: str, sop_instance_uid: str, now: float,
                 expected: int | None = None) -> None:
        """An instance of the series arrived (a repeat of a SOP Instance UID counts once)."""
        state = self._open.get(series_instance_uid)
        if state is None:
            state = self._open[series_instance_uid] = _Series(
                epoch=self._epochs.get(series_instance_uid, 0))
        if sop_instance_uid not in state.uids:
            state.uids.add(sop_instance_uid)
            state.count += 1
            state.stack_complete = False
        state.last_at = now
        if expected is not None and expected > 0:
            state.expected = expected

    def expect(self, series_instance_uid: str, expected: int) -> None:
        """The data says how many instances the series has (e.g. ImagesInAcquisition)."""
        state = self._open.get(series_instance_uid)
        if state is not None and expected > 0:
            state.expected = expected

    def released(self, series_instance_uid: str, now: float) -> None:
        """An association that delivered instances of the series ended."""
        state = self._open.get(series_instance_uid)
        if state is not None:
            state.released_at = now
            state.hold_until = 0.0

    def resumed(self, series_instance_uid: str, now: float, grace_s: float = 0.0) -> None:
        """The series was found unfinished at start-up: complete it ``grace_s`` (at least the
        quiet period) from now, unless instances keep arriving; a release of an association
        that delivers more of it ends the grace early."""
        state = self._open.get(series_instance_uid)
        if state is not None:
            state.resumed = True
            state.released_at = now
            state.hold_until = now + grace_s

    def stack_complete(self, series_instance_uid: str, instances: int) -> bool:
        """The caller found that the ``instances`` instances of the series form one gap-free
        stack: after a release it completes ``release_grace_s`` after the last instance.
        Ignored (False) when the count changed meanwhile."""
        state = self._open.get(series_instance_uid)
        if state is None or state.count != instances:
            return False
        state.stack_complete = True
        return True

    def instances(self, series_instance_uid: str) -> int:
        """Instances seen in the open epoch (0: not open)."""
        state = self._open.get(series_instance_uid)
        return state.count if state is not None else 0

    def is_released(self, series_instance_uid: str) -> bool:
        state = self._open.get(series_instance_uid)
        return state is not None and state.released_at is not None

    def is_open(self, series_instance_uid: str) -> bool:
        return series_instance_uid in self._open

    def _wait_after_release(self, state: _Series) -> float:
        return self.release_grace_s if state.stack_complete else self.quiet_period_s

    def _reason(self, state: _Series, now: float) -> CompletionReason | None:
        if state.expected is not None and state.count >= state.expected:
            return CompletionReason.EXPECTED_COUNT
        if state.released_at is not None and now >= state.hold_until and \
                now - max(state.released_at, state.last_at) >= self._wait_after_release(state):
            # a complete stack after its grace is RELEASED too (the metric's label set is fixed)
            return CompletionReason.RESUMED if state.resumed else CompletionReason.RELEASED
        if now - state.last_at >= self.max_wait_s:
            return CompletionReason.MAX_WAIT
        return None

    def due(self, now: float) -> list[Completion]:
        """Series complete at ``now``; each is reported once per epoch and stops being open."""
        done = []
        for uid, state in list(self._open.items()):
            reason = self._reason(state, now)
            if reason is None:
                continue
            del self._open[uid]
            self._epochs[uid] = state.epoch + 1
            done.append(Completion(uid, reason, state.count, state.last_at, state.epoch))
        return done

    def next_deadline(self) -> float | None:
        """The earliest monotonic instant at which :meth:`due` may report something."""
        times = []
        for state in self._open.values():
            if state.expected is not None and state.count >= state.expected:
                return state.last_at
            if state.released_at is not None:
                wait = self._wait_after_release(state)
                times.append(max(state.released_at + wait, state.hold_until,
                                 state.last_at + wait))
            times.append(state.last_at + self.max_wait_s)
        return min(times) if times else None
