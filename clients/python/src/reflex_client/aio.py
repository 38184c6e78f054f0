"""The asyncio flavour: :class:`AsyncClient` (grpc.aio) with the same calls as
:class:`~reflex_client.Client`, and :class:`AsyncProducer`, the producer's asyncio face."""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import grpc
import grpc.aio

from . import errors
from ._common import (
    ConnectOptions,
    FilterLike,
    ItemLike,
    TlsOptions,
    events_of,
    make_filter,
    make_item,
    similar_space,
)
from ._proto import reflex_pb2 as pb
from ._proto import reflex_pb2_grpc as pb_grpc
from .producer import EventResult, Producer, result_of

__all__ = ["AsyncClient", "AsyncProducer"]

_DEFAULT: Any = object()


class AsyncClient:
    """An asyncio connection to one Reflex server; arguments as :class:`~reflex_client.Client`.
    Use ``async with`` or ``await client.close()``."""

    def __init__(
        self,
        target: str,
        *,
        api_key: Optional[str] = None,
        tls: Union[TlsOptions, bool, None] = None,
        timeout: Optional[float] = 10.0,
        channel_options: Sequence[Tuple[str, Any]] = (),
        keepalive_ms: Tuple[int, int] = (20_000, 10_000),
    ) -> None:
        if tls is True:
            tls = TlsOptions()
        self.options = ConnectOptions(
            target=target,
            api_key=api_key,
            tls=tls or None,
            timeout=timeout,
            channel_options=tuple(channel_options),
            keepalive_ms=keepalive_ms,
        )
        creds = self.options.credentials()
        opts = self.options.grpc_options()
        self.channel: grpc.aio.Channel = (
            grpc.aio.secure_channel(target, creds, options=opts)
            if creds is not None
            else grpc.aio.insecure_channel(target, options=opts)
        )
        self._events = pb_grpc.EventServiceStub(self.channel)
        self._recommend = pb_grpc.RecommendServiceStub(self.channel)
        self._catalog = pb_grpc.CatalogServiceStub(self.channel)
        self._profiles = pb_grpc.ProfileServiceStub(self.channel)
        self._models = pb_grpc.ModelServiceStub(self.channel)
        self._metadata = self.options.metadata() or None

    async def _call(self, method: Any, request: Any, timeout: Optional[float]) -> Any:
        if timeout is _DEFAULT:
            timeout = self.options.timeout
        try:
            return await method(request, timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as err:
            raise errors.from_rpc_error(err) from None

    async def ingest(
        self,
        events: Iterable[Union["pb.Event", Mapping[str, Any]]],
        *,
        sequence: int = 0,
        raise_on_reject: bool = False,
        timeout: Optional[float] = _DEFAULT,
    ) -> List[EventResult]:
        """Applies one batch with the unary ``Ingest``; see :meth:`Client.ingest`."""
        request = pb.IngestRequest(sequence=sequence, events=events_of(events))
        ack = await self._call(self._events.Ingest, request, timeout)
        results = [result_of(r) for r in ack.results]
        rejected = [
            errors.RejectedEvent(r.event_id, r.status.value, r.reason)
            for r in results
            if r.status.value == "REJECTED"
        ]
        if raise_on_reject and rejected:
            raise errors.EventsRejected(rejected)
        return results

    def producer(self, **kwargs: Any) -> "AsyncProducer":
        """An :class:`AsyncProducer` to the same server with the same key and TLS (on a
        channel of its own); keyword arguments as :class:`~reflex_client.Producer`'s."""
        return AsyncProducer(Producer(self.options, **kwargs))

    async def recommend(
        self,
        user_id: str,
        count: int = 10,
        *,
        filter: FilterLike = None,
        timeout: Optional[float] = _DEFAULT,
    ) -> "pb.RecommendResponse":
        """See :meth:`Client.recommend`."""
        request = pb.RecommendRequest(user_id=user_id, count=count, filter=make_filter(filter))
        return await self._call(self._recommend.Recommend, request, timeout)  # type: ignore[no-any-return]

    async def similar_items(
        self,
        item_id: str,
        count: int = 10,
        *,
        space: Union[str, int] = "auto",
        filter: FilterLike = None,
        timeout: Optional[float] = _DEFAULT,
    ) -> "pb.SimilarItemsResponse":
        """See :meth:`Client.similar_items`."""
        request = pb.SimilarItemsRequest(
            item_id=item_id,
            count=count,
            filter=make_filter(filter),
            space=similar_space(space),  # type: ignore[arg-type]
        )
        return await self._call(self._recommend.SimilarItems, request, timeout)  # type: ignore[no-any-return]

    async def upsert_items(
        self, items: Iterable[ItemLike], *, timeout: Optional[float] = _DEFAULT
    ) -> int:
        """See :meth:`Client.upsert_items`."""
        request = pb.UpsertItemsRequest(items=[make_item(i) for i in items])
        return int((await self._call(self._catalog.UpsertItems, request, timeout)).upserted)

    async def get_item(self, item_id: str, *, timeout: Optional[float] = _DEFAULT) -> "pb.Item":
        """See :meth:`Client.get_item`."""
        return await self._call(self._catalog.GetItem, pb.GetItemRequest(item_id=item_id), timeout)  # type: ignore[no-any-return]

    async def delete_item(self, item_id: str, *, timeout: Optional[float] = _DEFAULT) -> bool:
        """See :meth:`Client.delete_item`."""
        return bool(
            (
                await self._call(
                    self._catalog.DeleteItem, pb.DeleteItemRequest(item_id=item_id), timeout
                )
            ).deleted
        )

    async def get_profile(
        self, user_id: str, *, timeout: Optional[float] = _DEFAULT
    ) -> "pb.Profile":
        """See :meth:`Client.get_profile`."""
        return await self._call(
            self._profiles.GetProfile, pb.GetProfileRequest(user_id=user_id), timeout
        )  # type: ignore[no-any-return]

    async def erase_profile(self, user_id: str, *, timeout: Optional[float] = _DEFAULT) -> bool:
        """See :meth:`Client.erase_profile`."""
        return bool(
            (
                await self._call(
                    self._profiles.EraseProfile, pb.EraseProfileRequest(user_id=user_id), timeout
                )
            ).erased
        )

    async def list_versions(
        self, *, timeout: Optional[float] = _DEFAULT
    ) -> "pb.ListVersionsResponse":
        """See :meth:`Client.list_versions`."""
        return await self._call(self._models.ListVersions, pb.ListVersionsRequest(), timeout)  # type: ignore[no-any-return]

    async def snapshot(
        self, reason: str = "", *, timeout: Optional[float] = _DEFAULT
    ) -> "pb.ModelVersion":
        """See :meth:`Client.snapshot`."""
        return await self._call(self._models.Snapshot, pb.SnapshotRequest(reason=reason), timeout)  # type: ignore[no-any-return]

    async def rollback(
        self, version: int, *, timeout: Optional[float] = _DEFAULT
    ) -> "pb.ModelVersion":
        """See :meth:`Client.rollback`."""
        return await self._call(self._models.Rollback, pb.RollbackRequest(version=version), timeout)  # type: ignore[no-any-return]

    async def get_quality(self, *, timeout: Optional[float] = _DEFAULT) -> "pb.GetQualityResponse":
        """See :meth:`Client.get_quality`."""
        return await self._call(self._models.GetQuality, pb.GetQualityRequest(), timeout)  # type: ignore[no-any-return]

    async def refit(
        self, *, install_anyway: bool = False, timeout: Optional[float] = _DEFAULT
    ) -> "pb.RefitResponse":
        """See :meth:`Client.refit`."""
        request = pb.RefitRequest(install_anyway=install_anyway)
        return await self._call(self._models.Refit, request, timeout)  # type: ignore[no-any-return]

    async def close(self) -> None:
        """Closes the channel."""
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncProducer:
    """The asyncio face of a :class:`~reflex_client.Producer`: the same batching, window
    and exactly-once resends (the stream runs on the producer's thread), with
    ``await``-able sends, flush and close."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer

    async def send(self, event: Any = None, **kwargs: Any) -> "asyncio.Future[EventResult]":
        """Queues one event (arguments as :meth:`Producer.send`) and returns an asyncio
        future of its result; waits, without blocking the loop, while the window is full."""
        try:
            fut = self.producer.send(event, timeout=0, **kwargs)
        except errors.ResourceExhausted:
            loop = asyncio.get_running_loop()
            fut = await loop.run_in_executor(
                None, functools.partial(self.producer.send, event, **kwargs)
            )
        return asyncio.wrap_future(fut)

    async def flush(self, timeout: Optional[float] = None) -> bool:
        """See :meth:`Producer.flush`."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.producer.flush, timeout)

    async def close(self, timeout: Optional[float] = None) -> None:
        """See :meth:`Producer.close`."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.producer.close, timeout)

    async def __aenter__(self) -> "AsyncProducer":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
