"""The result feed: filters, per-subscriber queues, unsubscribe on close, drop-oldest."""

from __future__ import annotations

import threading

from edge.pipeline.events import ResultEvent, ResultFeed, ResultState, WatchFilter


def event(series: str, study: str = "1.2", state: ResultState = ResultState.WRITTEN,
          uid: str = "1.9") -> ResultEvent:
    return ResultEvent(study, series, "lung_seg", 1, "seg", uid, state)


def test_subscribers_get_only_what_their_filter_matches() -> None:
    feed = ResultFeed()
    everything = feed.subscribe()
    one_series = feed.subscribe(WatchFilter(series_instance_uid="1.2.3"))
    other_study = feed.subscribe(WatchFilter(study_instance_uid="7.7"))
    feed.publish(event("1.2.3"))
    feed.publish(event("1.2.4"))
    assert [everything.get(0.1).series_instance_uid for _ in range(2)] == ["1.2.3", "1.2.4"]
    assert one_series.get(0.1).series_instance_uid == "1.2.3"
    assert one_series.get(0.01) is None
    assert other_study.get(0.01) is None


def test_close_unsubscribes_and_wakes_a_waiting_reader() -> None:
    feed = ResultFeed()
    subscription = feed.subscribe()
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(subscription.get(timeout=10)))
    reader.start()
    subscription.close()
    reader.join(5)
    assert got == [None] and not reader.is_alive()
    assert feed.subscribers == 0
    feed.publish(event("1.2.3"))  # nobody is left: nothing raises, nothing queued
    assert subscription.get(0.01) is None
    subscription.close()  # twice is fine


def test_a_slow_subscriber_loses_its_oldest_events_not_the_pipeline() -> None:
    feed = ResultFeed(capacity=3)
    slow = feed.subscribe()
    for i in range(5):
        feed.publish(event("1.2.3", uid=f"1.{i}"))
    assert slow.dropped == 2
    assert [slow.get(0.1).sop_instance_uid for _ in range(3)] == ["1.2", "1.3", "1.4"]


def test_publishing_from_many_threads_delivers_every_event() -> None:
    feed = ResultFeed(capacity=10_000)
    subscription = feed.subscribe()
    threads = [threading.Thread(target=lambda n=n: [feed.publish(event(f"1.{n}", uid=f"1.{i}"))
                                                    for i in range(200)]) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    received = [subscription.get(0.1) for _ in range(800)]
    assert all(e is not None for e in received) and subscription.dropped == 0
