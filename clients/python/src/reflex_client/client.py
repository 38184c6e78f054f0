"""The synchronous client: one channel, typed calls with deadlines and API keys, and
producers that share its channel."""

from __future__ import annotations

from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import grpc

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

__all__ = ["Client"]

T = TypeVar("T")
_DEFAULT: Any = object()


class Client:
    """A connection to one Reflex server.

    Args:
        target: ``host:port``.
        api_key: sent as ``x-api-key`` on every call (the server's ``auth.keys``).
        tls: TLS options (:class:`TlsOptions`), or True for TLS with the system's roots;
            None/False is plaintext.
        timeout: default deadline of every unary call in seconds; each method takes its
            own ``timeout`` too.
        channel_options: extra gRPC channel arguments.
        keepalive_ms: (interval, timeout) of HTTP/2 pings while calls are open: a stream
            to a server that vanished without closing the connection breaks after about
            their sum and the producer retries.
        channel: use this channel instead of making one (not closed by the client).

    Every failed call raises a :class:`~reflex_client.errors.ReflexError` subclass named
    after its status code (``NotFound``, ``InvalidArgument``, ``Unavailable``, ...).
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: Optional[str] = None,
        tls: Union[TlsOptions, bool, None] = None,
        timeout: Optional[float] = 10.0,
        channel_options: Sequence[Tuple[str, Any]] = (),
        keepalive_ms: Tuple[int, int] = (20_000, 10_000),
        channel: Optional[grpc.Channel] = None,
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
        self._own_channel = channel is None
        if channel is None:
            creds = self.options.credentials()
            opts = self.options.grpc_options()
            channel = (
                grpc.secure_channel(target, creds, options=opts)
                if creds is not None
                else grpc.insecure_channel(target, options=opts)
            )
        self.channel: grpc.Channel = channel
        self._events = pb_grpc.EventServiceStub(channel)
        self._recommend = pb_grpc.RecommendServiceStub(channel)
        self._catalog = pb_grpc.CatalogServiceStub(channel)
        self._profiles = pb_grpc.ProfileServiceStub(channel)
        self._models = pb_grpc.ModelServiceStub(channel)
        self._metadata = self.options.metadata() or None

    def _call(self, method: Any, request: Any, timeout: Optional[float]) -> Any:
        if timeout is _DEFAULT:
            timeout = self.options.timeout
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise errors.from_rpc_error(err) from None

    # ------------------------------------------------------------------ events

    def ingest(
        self,
        events: Iterable[Union["pb.Event", Mapping[str, Any]]],
        *,
        sequence: int = 0,
        raise_on_reject: bool = False,
        timeout: Optional[float] = _DEFAULT,
    ) -> List[EventResult]:
        """Applies one batch with the unary ``Ingest`` and returns one result per event.
        Events are ``Event`` messages or dicts of ``make_event`` arguments. With
        `raise_on_reject`, rejected events raise :class:`~reflex_client.errors.EventsRejected`
        (after the rest of the batch was applied)."""
        request = pb.IngestRequest(sequence=sequence, events=events_of(events))
        ack = self._call(self._events.Ingest, request, timeout)
        results = [result_of(r) for r in ack.results]
        if raise_on_reject:
            rejected = [
                errors.RejectedEvent(r.event_id, r.status.value, r.reason)
                for r in results
                if r.status.value == "REJECTED"
            ]
            if rejected:
                raise errors.EventsRejected(rejected)
        return results

    def producer(self, **kwargs: Any) -> Producer:
        """A :class:`Producer` on this client's channel and API key; keyword arguments
        as Producer's (max_batch, linger_ms, max_in_flight, max_retries, ...)."""
        return Producer(self.options, channel=self.channel, **kwargs)

    # ---------------------------------------------------------- recommendations

    def recommend(
        self,
        user_id: str,
        count: int = 10,
        *,
        filter: FilterLike = None,
        timeout: Optional[float] = _DEFAULT,
    ) -> "pb.RecommendResponse":
        """The user's recommendations (``items`` with item_id, score, source), best first.
        `filter` is a ``Filter`` or a dict of its fields (include_categories,
        exclude_categories, exclude_item_ids, exclude_purchased, exclude_seen)."""
        request = pb.RecommendRequest(user_id=user_id, count=count, filter=make_filter(filter))
        return self._call(self._recommend.Recommend, request, timeout)  # type: ignore[no-any-return]

    def similar_items(
        self,
        item_id: str,
        count: int = 10,
        *,
        space: Union[str, int] = "auto",
        filter: FilterLike = None,
        timeout: Optional[float] = _DEFAULT,
    ) -> "pb.SimilarItemsResponse":
        """Items similar to `item_id` in `space` ("auto", "mf", "content", "sequence")."""
        request = pb.SimilarItemsRequest(
            item_id=item_id,
            count=count,
            filter=make_filter(filter),
            space=similar_space(space),  # type: ignore[arg-type]
        )
        return self._call(self._recommend.SimilarItems, request, timeout)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ catalog

    def upsert_items(
        self, items: Iterable[ItemLike], *, timeout: Optional[float] = _DEFAULT
    ) -> int:
        """Adds or replaces catalog items (``Item`` or dicts of its fields); returns how many."""
        request = pb.UpsertItemsRequest(items=[make_item(i) for i in items])
        return int(self._call(self._catalog.UpsertItems, request, timeout).upserted)

    def get_item(self, item_id: str, *, timeout: Optional[float] = _DEFAULT) -> "pb.Item":
        """The catalog entry; :class:`~reflex_client.errors.NotFound` when absent."""
        return self._call(self._catalog.GetItem, pb.GetItemRequest(item_id=item_id), timeout)  # type: ignore[no-any-return]

    def delete_item(self, item_id: str, *, timeout: Optional[float] = _DEFAULT) -> bool:
        """Removes an item from the catalog; False when it was not there."""
        return bool(
            self._call(
                self._catalog.DeleteItem, pb.DeleteItemRequest(item_id=item_id), timeout
            ).deleted
        )

    # ----------------------------------------------------------------- profiles

    def get_profile(self, user_id: str, *, timeout: Optional[float] = _DEFAULT) -> "pb.Profile":
        """The user's profile (kind_counts, recent, session, ...); NotFound when none."""
        return self._call(self._profiles.GetProfile, pb.GetProfileRequest(user_id=user_id), timeout)  # type: ignore[no-any-return]

    def erase_profile(self, user_id: str, *, timeout: Optional[float] = _DEFAULT) -> bool:
        """Forgets the user's profile; False when there was none."""
        return bool(
            self._call(
                self._profiles.EraseProfile, pb.EraseProfileRequest(user_id=user_id), timeout
            ).erased
        )

    # ------------------------------------------------------------------- models

    def list_versions(self, *, timeout: Optional[float] = _DEFAULT) -> "pb.ListVersionsResponse":
        """The stored model versions, oldest first, and the label being served."""
        return self._call(self._models.ListVersions, pb.ListVersionsRequest(), timeout)  # type: ignore[no-any-return]

    def snapshot(
        self, reason: str = "", *, timeout: Optional[float] = _DEFAULT
    ) -> "pb.ModelVersion":
        """Stores the model as it is now as a new version."""
        return self._call(self._models.Snapshot, pb.SnapshotRequest(reason=reason), timeout)  # type: ignore[no-any-return]

    def rollback(self, version: int, *, timeout: Optional[float] = _DEFAULT) -> "pb.ModelVersion":
        """Puts the model back to a stored version (recorded as a new one); NotFound for
        an unknown version."""
        return self._call(self._models.Rollback, pb.RollbackRequest(version=version), timeout)  # type: ignore[no-any-return]

    def get_quality(self, *, timeout: Optional[float] = _DEFAULT) -> "pb.GetQualityResponse":
        """The continuous (prequential) evaluation figures."""
        return self._call(self._models.GetQuality, pb.GetQualityRequest(), timeout)  # type: ignore[no-any-return]

    def refit(
        self, *, install_anyway: bool = False, timeout: Optional[float] = _DEFAULT
    ) -> "pb.RefitResponse":
        """Fits the batch baseline to the event log now and installs it when it ranks the
        quality holdout better (or ``install_anyway``); may take seconds."""
        request = pb.RefitRequest(install_anyway=install_anyway)
        return self._call(self._models.Refit, request, timeout)  # type: ignore[no-any-return]

    # --------------------------------------------------------------- lifecycle

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Waits until the channel connects; :class:`~reflex_client.errors.Unavailable`
        after `timeout` seconds."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise errors.Unavailable(
                f"{self.options.target} not reachable within {timeout}s"
            ) from None

    def close(self) -> None:
        """Closes the channel (when the client made it)."""
        if self._own_channel:
            self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
