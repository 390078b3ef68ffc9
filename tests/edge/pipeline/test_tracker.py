"""Series completion state machine: driven by explicit times, no threads, no sleeping."""

from __future__ import annotations

import pytest

from edge.pipeline.tracker import CompletionReason, SeriesTracker


def test_release_then_quiet_period() -> None:
    t = SeriesTracker(quiet_period_s=0.5, max_wait_s=60)
    for i in range(3):
        t.instance("s", f"i{i}", now=10.0 + i * 0.1)
    assert t.due(11.0) == []
    t.released("s", now=10.3)
    assert t.next_deadline() == pytest.approx(10.8)
    assert t.due(10.7) == []
    (done,) = t.due(10.8)
    assert (done.reason, done.instances, done.epoch) == (CompletionReason.RELEASED, 3, 0)
    assert not t.is_open("s") and t.due(100.0) == []


def test_instance_after_release_restarts_the_quiet_period() -> None:
    t = SeriesTracker(quiet_period_s=0.5, max_wait_s=60)
    t.instance("s", "a", now=0.0)
    t.released("s", now=0.1)  # first association done, a second one still sends
    t.instance("s", "b", now=0.4)
    assert t.due(0.7) == []
    assert [c.instances for c in t.due(0.9)] == [2]


def test_expected_count_completes_without_release() -> None:
    t = SeriesTracker(quiet_period_s=5, max_wait_s=60)
    t.instance("s", "a", now=0.0)
    t.expect("s", 2)
    t.instance("s", "a", now=0.1)  # a repeat counts once
    assert t.due(0.2) == []
    t.instance("s", "b", now=0.3)
    assert t.next_deadline() == pytest.approx(0.3)
    (done,) = t.due(0.3)
    assert done.reason is CompletionReason.EXPECTED_COUNT


def test_max_wait_without_release() -> None:
    t = SeriesTracker(quiet_period_s=0.5, max_wait_s=30)
    t.instance("s", "a", now=0.0)
    t.instance("s", "b", now=20.0)
    assert t.due(49.0) == []
    (done,) = t.due(50.0)
    assert done.reason is CompletionReason.MAX_WAIT


def test_late_instance_opens_a_new_epoch() -> None:
    t = SeriesTracker(quiet_period_s=0.0, max_wait_s=30)
    t.instance("s", "a", now=0.0)
    t.released("s", now=0.0)
    assert [c.epoch for c in t.due(0.0)] == [0]
    t.instance("s", "late", now=5.0)
    t.released("s", now=5.0)
    (again,) = t.due(5.0)
    assert (again.epoch, again.instances) == (1, 1)


def test_resumed_series_and_independent_series() -> None:
    t = SeriesTracker(quiet_period_s=1.0, max_wait_s=30)
    t.instance("old", "a", now=0.0)
    t.resumed("old", now=0.0)
    t.instance("new", "x", now=0.5)
    t.released("unknown", now=0.5)  # a series never seen: ignored
    (done,) = t.due(1.0)
    assert (done.series_instance_uid, done.reason) == ("old", CompletionReason.RESUMED)
    assert t.is_open("new")


def test_invalid_settings() -> None:
    with pytest.raises(ValueError):
        SeriesTracker(quiet_period_s=-1, max_wait_s=1)


def test_resumed_series_waits_for_the_senders_retry() -> None:
    t = SeriesTracker(quiet_period_s=0.5, max_wait_s=60)
    t.instance("s", "a", now=0.0)
    t.resumed("s", now=0.0, grace_s=5.0)
    assert t.next_deadline() == pytest.approx(5.0)
    assert t.due(4.9) == []
    t.instance("s", "b", now=1.0)  # the sender retries: a new association ...
    t.released("s", now=1.2)  # ... ends, so the normal quiet period applies
    assert [c.instances for c in t.due(1.7)] == [2]


def test_complete_stack_completes_after_the_release_grace() -> None:
    tracker = SeriesTracker(quiet_period_s=0.5, max_wait_s=60, release_grace_s=0.1)
    tracker.instance("s", "a", 0.0)
    tracker.instance("s", "b", 0.0)
    assert tracker.stack_complete("s", 2)
    tracker.released("s", 0.0)
    assert tracker.next_deadline() == 0.1
    assert not tracker.due(0.05)
    assert [c.reason for c in tracker.due(0.1)] == [CompletionReason.RELEASED]


def test_a_new_instance_cancels_the_complete_stack() -> None:
    tracker = SeriesTracker(quiet_period_s=0.5, max_wait_s=60, release_grace_s=0.1)
    tracker.instance("s", "a", 0.0)
    assert not tracker.stack_complete("s", 2)  # the caller saw another count: ignored
    assert tracker.stack_complete("s", 1)
    tracker.instance("s", "b", 0.0)
    tracker.released("s", 0.0)
    assert not tracker.due(0.2)
    assert [c.reason for c in tracker.due(0.5)] == [CompletionReason.RELEASED]


def test_release_grace_never_exceeds_the_quiet_period() -> None:
    assert SeriesTracker(quiet_period_s=0.2, max_wait_s=60, release_grace_s=1.0) \
        .release_grace_s == 0.2
