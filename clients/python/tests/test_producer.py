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


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_producer_survives_a_server_restart_exactly_once(server, report, how: str) -> None:
    """Half-way through the events the server dies (kill -9: no flush, no goodbye; or
    SIGTERM: it drains) and comes back on the same port and data directory while the
    producer keeps sending. Afterwards every event is applied exactly once."""
    users, per_user = 40, 60
    total = users * per_user
    events = [
        (f"e-{u}-{i}", f"user{u}", f"item{(u * 7 + i) % 97}", "view" if i % 3 else "click")
        for i in range(per_user)
        for u in range(users)
    ]
    futures: List["Future[rc.EventResult]"] = []

    def restart() -> None:
        if how == "kill -9":
            server.kill9()
        else:
            server.stop()
        time.sleep(0.3)
        server.start()

    with rc.Client(server.target) as client:
        producer = client.producer(
            max_batch=25, linger_ms=2, max_in_flight=4, max_retries=50, backoff_max_ms=500
        )
        restarter = threading.Thread(target=restart)
        started = time.monotonic()
        for n, (event_id, user, item, kind) in enumerate(events):
            if n == total // 2:
                # Once the first third is acknowledged, with the rest still to send.
                assert _wait_all(futures[: total // 3], 60)
                restarter.start()
            futures.append(producer.send(user_id=user, item_id=item, kind=kind, event_id=event_id))
        assert producer.flush(timeout=90), "not every event was acknowledged"
        elapsed = time.monotonic() - started
        restarter.join()
        producer.close()

        results = [f.result() for f in futures]
        statuses = Counter(r.status.value for r in results)
        s = producer.stats
        report(
            f"producer across {how} + restart: {total} events in {elapsed:.2f}s, "
            f"{dict(statuses)}, {s.streams_opened} streams, {s.batches_resent} batches resent"
        )
        # Every event is in the server: accepted, or accepted before the break and its
        # resend answered DUPLICATE.
        assert set(statuses) <= {"ACCEPTED", "DUPLICATE"}, statuses
        assert [r.event_id for r in results] == [e[0] for e in events]
        assert producer.stats.streams_opened >= 2

        # ...and applied exactly once: each profile counts each of its events once.
        expected: Counter = Counter()
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


def test_retries_honour_the_servers_pushback(make_server) -> None:
    """At the server's stream limit a new stream is refused RESOURCE_EXHAUSTED with
    grpc-retry-pushback-ms; the producer waits as told and gets in once a stream closes."""
    server = make_server(
        {"REFLEX_LIMITS__MAX_STREAMS": "1", "REFLEX_LIMITS__RETRY_PUSHBACK_MS": "150"}
    )
    with rc.Client(server.target) as client:
        first = client.producer(linger_ms=1)
        assert first.send(user_id="p", item_id="a").result(timeout=30).applied  # holds the stream
        second = client.producer(linger_ms=1, max_retries=100)
        fut = second.send(user_id="p", item_id="b")
        deadline = time.monotonic() + 30
        while second.stats.retries == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert second.stats.last_pushback_ms == 150
        assert not fut.done()
        first.close()
        assert fut.result(timeout=30).status is EventStatus.ACCEPTED
        second.close()
        assert client.get_profile("p").kind_counts["view"] == 2


def _wait_all(futures: List["Future[rc.EventResult]"], timeout: float) -> bool:
    from concurrent.futures import wait

    _, not_done = wait(futures, timeout=timeout)
    return not not_done


def test_concurrent_producers_with_the_same_ids_apply_each_event_once(server) -> None:
    """Three producers race to send the same 1 500 events: each is ACCEPTED by exactly
    one of them and DUPLICATE for the others, and each profile counts it once."""
    events = [(f"race-{i}", f"r{i % 15}", f"it{i % 40}") for i in range(1500)]
    outcomes: List[List[EventStatus]] = []

    def run(client: rc.Client) -> None:
        with client.producer(max_batch=50, linger_ms=1, max_in_flight=8) as producer:
            futures = [producer.send(user_id=u, item_id=it, event_id=e) for e, u, it in events]
            assert producer.flush(timeout=60)
            outcomes.append([f.result().status for f in futures])

    with rc.Client(server.target) as client:
        threads = [threading.Thread(target=run, args=(client,)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(outcomes) == 3
        for i in range(len(events)):
            column = sorted(o[i].value for o in outcomes)
            assert column == ["ACCEPTED", "DUPLICATE", "DUPLICATE"], (events[i], column)
        views = sum(client.get_profile(f"r{u}").kind_counts["view"] for u in range(15))
        assert views == len(events)


def test_a_hung_server_is_detected_by_keepalive_and_nothing_is_applied_twice(
    server, report
) -> None:
    """The server hangs (SIGSTOP) mid-stream without closing its connection: keepalive
    pings break the stream, the producer reconnects and resends, and once the server runs
    again every event is applied exactly once (the old connection's batches and their
    resends race on the server; the dedupe keeps one of each)."""
    events = [(f"h-{i}", f"hung{i % 10}", f"it{i % 30}") for i in range(1200)]
    futures: List["Future[rc.EventResult]"] = []
    with rc.Client(server.target, keepalive_ms=(200, 300)) as client:
        producer = client.producer(max_batch=20, linger_ms=2, max_in_flight=4, max_retries=50)
        for n, (event_id, user, item) in enumerate(events):
            if n == len(events) // 2:
                assert _wait_all(futures[: len(events) // 4], 60)
                server.pause()
                threading.Timer(3.0, server.resume).start()
            futures.append(producer.send(user_id=user, item_id=item, event_id=event_id))
        assert producer.flush(timeout=90)
        producer.close()
        statuses = Counter(f.result().status.value for f in futures)
        report(
            f"producer across a 3 s SIGSTOP: {dict(statuses)}, "
            f"{producer.stats.streams_opened} streams, {producer.stats.batches_resent} resent"
        )
        assert set(statuses) <= {"ACCEPTED", "DUPLICATE"}, statuses
        assert producer.stats.streams_opened >= 2
        views = sum(client.get_profile(f"hung{u}").kind_counts["view"] for u in range(10))
        assert views == len(events)
