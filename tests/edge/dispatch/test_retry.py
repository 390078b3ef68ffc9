"""RetryPolicy backoff and the one status classifier."""

from __future__ import annotations

import pytest

from edge.core.config import load_settings
from edge.dispatch import LocalStatus, RetryPolicy, Verdict, classify


def test_backoff_is_exponential_and_capped_without_jitter() -> None:
    policy = RetryPolicy(initial_s=1.0, factor=2.0, max_s=10.0, max_attempts=6, jitter=0.0)
    assert [policy.next_delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert policy.next_delay(10_000) == 10.0


def test_jitter_only_shortens_and_uses_the_given_random_source() -> None:
    policy = RetryPolicy(initial_s=4.0, factor=2.0, max_s=100.0, max_attempts=3, jitter=0.5)
    assert policy.next_delay(1, rand=lambda: 0.0) == 4.0
    assert policy.next_delay(1, rand=lambda: 1.0) == 2.0
    assert all(2.0 <= policy.next_delay(1) <= 4.0 for _ in range(100))


def test_exhausted_counts_every_try() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert not policy.exhausted(2)
    assert policy.exhausted(3)


@pytest.mark.parametrize("kwargs", [
    {"initial_s": 0}, {"max_s": -1}, {"max_attempts": 0}, {"factor": 0.5}, {"jitter": 1.5}])
def test_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_attempts_are_one_based() -> None:
    with pytest.raises(ValueError, match="attempt"):
        RetryPolicy().next_delay(0)


def test_defaults_come_from_settings() -> None:
    settings = load_settings(environ={"MEDEDGE_DISPATCH__RETRY_MAX_ATTEMPTS": "3"},
                             overrides={"dispatch": {"retry_initial_s": 0.5}}).dispatch
    policy = RetryPolicy.from_settings(settings)
    assert (policy.initial_s, policy.max_attempts) == (0.5, 3)
    assert RetryPolicy.from_settings(load_settings(environ={}).dispatch) == RetryPolicy()


@pytest.mark.parametrize(("status", "verdict"), [
    (0x0000, Verdict.DELIVERED),
    (0xB000, Verdict.DELIVERED),  # coercion of data elements (PS3.4 B.2.3)
    (0xB007, Verdict.DELIVERED),
    (0xA700, Verdict.TRANSIENT),  # out of resources
    (0xA7FF, Verdict.TRANSIENT),
    (0x0110, Verdict.TRANSIENT),  # processing failure (PS3.7 C)
    (0x0213, Verdict.TRANSIENT),  # resource limitation
    (LocalStatus.NO_ASSOCIATION, Verdict.TRANSIENT),
    (0xA900, Verdict.PERMANENT),  # data set does not match SOP class
    (0xA9FF, Verdict.PERMANENT),
    (0xC000, Verdict.PERMANENT),  # cannot understand
    (0xCFFF, Verdict.PERMANENT),
    (0x0122, Verdict.PERMANENT),  # SOP class not supported
    (0x0124, Verdict.PERMANENT),  # not authorized
    (LocalStatus.UNREADABLE_FILE, Verdict.PERMANENT),
    (LocalStatus.NO_CONTEXT, Verdict.PERMANENT),
])
def test_classify(status: int, verdict: Verdict) -> None:
    assert classify(status) is verdict
