"""The streaming producer against the real server: applied events show in profiles and
recommendations, and a kill -9 and restart mid-stream loses and doubles nothing."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import List

import pytest

import reflex_client as rc
from reflex_client import EventStatus


def test_streamed_events_are_applied_and_recommend_reflects_them(server) -> None:
    with rc.Client(server.target) as client:
        with client.producer(max_batch=16, linger_ms=2, max_in_flight=4) as producer:
            futures: List["Future[rc.EventResult]"] = []
            # Twenty shoppers go from the kettle to the teapot.
            for u in range(20):
                futures.append(producer.send(user_id=f"u{u}", item_id="kettle", kind="view"))
                futures.append(producer.send(user_id=f"u{u}", item_id="teapot", kind="purchase"))
            futures.append(producer.send(user_id="alice", item_id="kettle", kind="view"))
            futures.append(producer.send(user_id="alice", item_id="kettle", kind="click"))
            assert producer.flush(timeout=30)
            results = [f.result() for f in futures]
            assert [r.status for r in results] == [EventStatus.ACCEPTED] * len(futures)
            assert producer.stats.batches_acked >= 3  # 42 events in batches of 16

        profile = client.get_profile("alice")
        assert dict(profile.kind_counts) == {"view": 1, "click": 1}
        rec = client.recommend("alice", 5)
        assert rec.profile_version == profile.version
        # What the others did after the kettle reaches alice at once.
        assert "teapot" in [i.item_id for i in rec.items], rec


def test_same_event_id_twice_is_a_duplicate(server) -> None:
    with rc.Client(server.target) as client, client.producer(linger_ms=1) as producer:
        first = producer.send(user_id="bob", item_id="mug", kind="purchase", event_id="bob-mug-1")
        assert first.result(timeout=30).status is EventStatus.ACCEPTED
        again = producer.send(user_id="bob", item_id="mug", kind="purchase", event_id="bob-mug-1")
        assert again.result(timeout=30).status is EventStatus.DUPLICATE
        assert client.get_profile("bob").kind_counts["purchase"] == 1


def test_rejected_events_carry_their_reason(server) -> None:
    with rc.Client(server.target) as client:
        with client.producer(linger_ms=1) as producer:
            bad = producer.send(user_id="carol", item_id="", kind="view")
            good = producer.send(user_id="carol", item_id="cup", kind="view")
            result = bad.result(timeout=30)
            assert result.status is EventStatus.REJECTED
            assert "item_id" in result.reason
            assert good.result(timeout=30).status is EventStatus.ACCEPTED
        with client.producer(linger_ms=1, raise_on_reject=True) as strict:
            fut = strict.send(user_id="carol", item_id="x" * 200, kind="view")
            with pytest.raises(rc.errors.EventsRejected) as err:
                fut.result(timeout=30)
            assert "item_id" in err.value.rejected[0].reason


def test_backpressure_blocks_when_the_window_is_full(server) -> None:
    """With the server gone, a window of one batch of two fills up and send() blocks
    (here until its timeout) instead of queueing without bound; close() with a timeout
    then fails what is pending."""
    with rc.Client(server.target) as client:
        server.kill9()
        producer = client.producer(max_batch=2, max_in_flight=1, linger_ms=1, max_retries=1000)
        queued = [
            producer.send(user_id="d", item_id="i1"),
            producer.send(user_id="d", item_id="i2"),  # seals batch 1: the window is full
            producer.send(user_id="d", item_id="i3"),
            producer.send(user_id="d", item_id="i4"),  # the open batch is full too
        ]
        started = time.monotonic()
        with pytest.raises(rc.errors.ResourceExhausted):
            producer.send(user_id="d", item_id="i5", timeout=0.2)
        assert time.monotonic() - started >= 0.2
        assert not any(f.done() for f in queued)
        producer.close(timeout=0.5)
        for f in queued:
            with pytest.raises(rc.errors.ProducerClosed):
                f.result(timeout=5)
        with pytest.raises(rc.errors.ProducerClosed):
            producer.send(user_id="d", item_id="i6")


def test_bounded_retries_fail_with_the_typed_error(server) -> None:
    with rc.Client(server.target) as client:
        server.kill9()
        with client.producer(linger_ms=1, max_retries=2, backoff_initial_ms=10) as producer:
            fut = producer.send(user_id="e", item_id="i1")
            with pytest.raises(rc.errors.Unavailable) as err:
                fut.result(timeout=30)
            assert err.value.code.name == "UNAVAILABLE"
            assert producer.stats.retries == 3


def test_producer_survives_kill9_and_restart_exactly_once(server) -> None:
    users, per_user = 40, 60
    total = users * per_user
    futures: List["Future[rc.EventResult]"] = []
    events = [
        (f"e-{u}-{i}", f"user{u}", f"item{(u * 7 + i) % 97}", "view" if i % 3 else "click")
        for i in range(per_user)
        for u in range(users)
    ]
    with rc.Client(server.target) as client:
        producer = client.producer(
            max_batch=25, linger_ms=2, max_in_flight=4, max_retries=50, backoff_max_ms=500
        )
        killed = threading.Event()
        done_at_kill: List[int] = []

        def chaos() -> None:
            # Kill once a third of the events have an answer, while the rest stream on.
            while sum(f.done() for f in list(futures)) < total // 3:
                time.sleep(0.005)
            done_at_kill.append(sum(f.done() for f in list(futures)))
            server.kill9()
            killed.set()
            time.sleep(0.3)
            server.start()

        thread = threading.Thread(target=chaos)
        thread.start()
        started = time.monotonic()
        for event_id, user, item, kind in events:
            futures.append(producer.send(user_id=user, item_id=item, kind=kind, event_id=event_id))
        assert producer.flush(timeout=90), "not every event was acknowledged"
        elapsed = time.monotonic() - started
        thread.join()
        producer.close()
        assert killed.is_set()
        assert done_at_kill[0] < total, "the kill came after the stream had finished"

        results = [f.result() for f in futures]
        statuses = Counter(r.status for r in results)
        print(
            f"\n{total} events in {elapsed:.2f}s across a kill -9 and restart: {dict(statuses)}, "
            f"{producer.stats}"
        )
        # Every event is in the server: accepted, or accepted before the kill and its
        # resend answered DUPLICATE.
        assert set(statuses) <= {EventStatus.ACCEPTED, EventStatus.DUPLICATE}, statuses
        assert [r.event_id for r in results] == [e[0] for e in events]
        assert producer.stats.streams_opened >= 2
        assert producer.stats.batches_resent >= 1

        # ...and applied exactly once: each profile counts each of its events once.
        expected = Counter()
        for _, user, _, kind in events:
            expected[(user, kind)] += 1
        for u in range(users):
            counts = dict(client.get_profile(f"user{u}").kind_counts)
            want = {k: expected[(f"user{u}", k)] for k in ("view", "click")}
            assert counts == want, f"user{u}: {counts} != {want}"

        # The dedupe survived the restart: every event sent again is a DUPLICATE.
        with client.producer(max_batch=200, linger_ms=1) as again:
            repeats = [
                again.send(user_id=user, item_id=item, kind=kind, event_id=event_id)
                for event_id, user, item, kind in events
            ]
            assert again.flush(timeout=60)
        assert {f.result().status for f in repeats} == {EventStatus.DUPLICATE}
