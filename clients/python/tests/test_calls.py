"""Plain calls against the real server: catalog, profiles, recommendations (a 50-item
Recommend, timed and printed), model versions, typed errors and the asyncio client."""

from __future__ import annotations

import asyncio
import socket
import statistics
import time

import grpc
import pytest

import reflex_client as rc
from reflex_client import EventStatus


def seed(client: rc.Client, users: int = 30, items: int = 80) -> None:
    """Events over `items` items from `users` users, through the unary Ingest."""
    events = [
        {"user_id": f"s{u}", "item_id": f"item{(u * 13 + i) % items}", "kind": "view"}
        for u in range(users)
        for i in range(12)
    ]
    for start in range(0, len(events), 200):
        results = client.ingest(events[start : start + 200], raise_on_reject=True)
        assert {r.status for r in results} == {EventStatus.ACCEPTED}


def test_catalog_and_profiles(server) -> None:
    with rc.Client(server.target) as client:
        n = client.upsert_items(
            [
                {"item_id": "tea", "title": "Green tea", "categories": ["drinks"]},
                rc.pb.Item(item_id="pot", title="Teapot", categories=["kitchen"], available=False),
            ]
        )
        assert n == 2
        item = client.get_item("pot")
        assert (item.title, list(item.categories), item.available) == ("Teapot", ["kitchen"], False)
        assert client.delete_item("pot") is True
        assert client.delete_item("pot") is False
        with pytest.raises(rc.errors.NotFound) as err:
            client.get_item("pot")
        assert err.value.code == grpc.StatusCode.NOT_FOUND

        client.ingest([{"user_id": "zoe", "item_id": "tea", "kind": "purchase"}])
        profile = client.get_profile("zoe")
        assert profile.kind_counts["purchase"] == 1
        assert list(profile.purchased_item_ids) == ["tea"]
        assert client.erase_profile("zoe") is True
        with pytest.raises(rc.errors.NotFound):
            client.get_profile("zoe")
        assert client.erase_profile("zoe") is False


def test_recommend_50_items_and_similar_items(server, report) -> None:
    with rc.Client(server.target) as client:
        seed(client)
        first = client.recommend("s1", 50)
        assert len(first.items) == 50
        assert len({i.item_id for i in first.items}) == 50
        assert first.model_version

        def timed(user: str) -> float:
            started = time.perf_counter()
            rec = client.recommend(user, 50)
            elapsed = (time.perf_counter() - started) * 1000
            assert len(rec.items) == 50
            return elapsed

        # Each seeded user's first answer is computed; asked again, it may be cached.
        fresh = sorted(timed(f"s{u}") for u in range(2, 30))
        repeated = sorted(timed("s1") for _ in range(30))
        # Measured, not asserted: the figures depend on the machine and the build.
        report(
            f"Recommend(count=50) from Python over gRPC: first answer per user (28 users) "
            f"median {statistics.median(fresh):.2f} ms, max {fresh[-1]:.2f} ms; same user "
            f"again (30 calls) median {statistics.median(repeated):.2f} ms, "
            f"max {repeated[-1]:.2f} ms"
        )
        filtered = client.recommend(
            "s1", 10, filter={"exclude_item_ids": [i.item_id for i in first.items[:5]]}
        )
        assert not {i.item_id for i in filtered.items} & {i.item_id for i in first.items[:5]}

        similar = client.similar_items("item1", 5, space="mf")
        assert 0 < len(similar.items) <= 5
        assert "item1" not in [i.item_id for i in similar.items]
        with pytest.raises(rc.errors.NotFound):
            client.similar_items("never-seen", 5, space="mf")


def test_model_versions_snapshot_and_rollback(server) -> None:
    with rc.Client(server.target) as client:
        seed(client, users=5, items=10)
        taken = client.snapshot("from-python")
        assert taken.reason == "from-python"
        listed = client.list_versions()
        assert taken.id in [v.id for v in listed.versions]
        assert listed.serving
        rolled = client.rollback(taken.id)
        assert rolled.reason == f"rollback to {taken.id}"
        assert rolled.id > taken.id
        with pytest.raises(rc.errors.NotFound):
            client.rollback(999_999)
        quality = client.get_quality()
        assert quality.events_scored >= 0
        refit = client.refit(install_anyway=True, timeout=60)
        assert refit.outcome == "installed"
        assert refit.version.reason.startswith("refit: als")
        assert client.list_versions().serving == f"online-mf/v{refit.version.id}"


def test_typed_errors_on_bad_input(make_server) -> None:
    server = make_server({"REFLEX_ENGINE__MAX_BATCH": "10"})
    with rc.Client(server.target) as client:
        with pytest.raises(rc.errors.InvalidArgument) as err:
            client.recommend("", 5)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "user_id" in err.value.details
        with pytest.raises(rc.errors.InvalidArgument):
            client.recommend("u", 100_000)

        with pytest.raises(rc.errors.EventsRejected) as rejected:
            client.ingest(
                [
                    {"user_id": "u", "item_id": "ok", "kind": "view"},
                    {"user_id": "u", "item_id": "", "kind": "view", "event_id": "bad-1"},
                    {
                        "user_id": "u",
                        "item_id": "w",
                        "kind": "custom",
                        "custom_kind": "x",
                        "weight": 99.0,
                        "event_id": "bad-2",
                    },
                ],
                raise_on_reject=True,
            )
        reasons = {r.event_id: r.reason for r in rejected.value.rejected}
        assert set(reasons) == {"bad-1", "bad-2"}
        assert "item_id" in reasons["bad-1"] and "weight" in reasons["bad-2"]
        # The valid event of that batch was applied.
        assert client.get_profile("u").kind_counts["view"] == 1
        with pytest.raises(rc.errors.InvalidArgument):
            client.similar_items("ok", 5, space="content")  # the content model is off

        with pytest.raises(rc.errors.ResourceExhausted):  # over engine.max_batch
            client.ingest([{"user_id": "u", "item_id": f"i{i}"} for i in range(11)])

        # A producer whose batches are over the server's limit: those batches fail with
        # the server's status; the producer goes on with the next ones.
        with client.producer(max_batch=11, linger_ms=1) as producer:
            big = [producer.send(user_id="v", item_id=f"i{i}") for i in range(11)]
            for fut in big:
                with pytest.raises(rc.errors.ResourceExhausted):
                    fut.result(timeout=30)
            small = producer.send(user_id="v", item_id="fine")
            assert small.result(timeout=30).status is EventStatus.ACCEPTED

        with pytest.raises(ValueError):
            client.ingest([{"user_id": "u", "item_id": "i", "kind": "teleport"}])

    with rc.Client(f"127.0.0.1:{server.port}", timeout=2) as client:
        server.kill9()
        with pytest.raises(rc.errors.Unavailable):
            client.recommend("u", 5)

    # A listener that never speaks HTTP/2: the call ends at its deadline.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        with rc.Client(f"127.0.0.1:{silent.getsockname()[1]}") as client:
            with pytest.raises(rc.errors.DeadlineExceeded) as late:
                client.recommend("u", 5, timeout=0.3)
            assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_async_client_and_producer(server) -> None:
    async def main() -> None:
        async with rc.AsyncClient(server.target) as client:
            async with client.producer(linger_ms=1, max_in_flight=2, max_batch=8) as producer:
                futures = [
                    await producer.send(user_id=f"a{i % 4}", item_id=f"it{i % 9}", kind="click")
                    for i in range(100)
                ]
                results = await asyncio.gather(*futures)
                assert {r.status for r in results} == {EventStatus.ACCEPTED}
                assert await producer.flush(timeout=10)
            profile = await client.get_profile("a1")
            assert profile.kind_counts["click"] == 25
            rec = await client.recommend("a1", 5)
            assert len(rec.items) == 5
            assert await client.upsert_items([{"item_id": "it1", "title": "one"}]) == 1
            assert (await client.get_item("it1")).title == "one"
            similar = await client.similar_items("it1", 3)
            assert len(similar.items) > 0
            assert len((await client.list_versions()).serving) > 0
            results = await client.ingest([{"user_id": "a1", "item_id": "", "kind": "view"}])
            assert results[0].status is EventStatus.REJECTED
            with pytest.raises(rc.errors.NotFound):
                await client.get_profile("nobody")
            with pytest.raises(rc.errors.InvalidArgument):
                await client.recommend("", 5)
            assert await client.erase_profile("a1") is True

    asyncio.run(main())


def test_async_producer_waits_for_the_window_without_blocking_the_loop(server) -> None:
    """With the server down and the window full, an awaited send() waits while other
    coroutines keep running; once the server is back everything is delivered."""

    async def main() -> None:
        async with rc.AsyncClient(server.target) as client:
            server.kill9()
            producer = client.producer(
                max_batch=1, max_in_flight=1, linger_ms=1, max_retries=1000, backoff_max_ms=200
            )
            first = await producer.send(user_id="w", item_id="i1")  # the window's one batch
            second = await producer.send(user_id="w", item_id="i2")  # fills the open batch
            third = asyncio.ensure_future(producer.send(user_id="w", item_id="i3"))
            # The loop keeps turning (these sleeps end) while the third send waits.
            for _ in range(20):
                await asyncio.sleep(0.01)
            assert not third.done()
            await asyncio.get_running_loop().run_in_executor(None, server.start)
            results = await asyncio.gather(first, second, await third)
            assert [r.status for r in results] == [EventStatus.ACCEPTED] * 3
            await producer.close()
            assert (await client.get_profile("w")).kind_counts["view"] == 3

    asyncio.run(main())
