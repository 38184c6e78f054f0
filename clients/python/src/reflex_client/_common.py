"""What the sync and asyncio clients share: connection options, metadata, and building
events, filters and items from plain Python values."""

from __future__ import annotations

import datetime as _dt
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from google.protobuf.timestamp_pb2 import Timestamp

from ._proto import reflex_pb2 as pb

#: The event kinds by their short names, as profiles count them.
KINDS: Dict[str, int] = {
    "view": pb.EVENT_KIND_VIEW,
    "click": pb.EVENT_KIND_CLICK,
    "add_to_cart": pb.EVENT_KIND_ADD_TO_CART,
    "remove_from_cart": pb.EVENT_KIND_REMOVE_FROM_CART,
    "purchase": pb.EVENT_KIND_PURCHASE,
    "custom": pb.EVENT_KIND_CUSTOM,
}

#: Similar-item spaces by their short names.
SPACES: Dict[str, int] = {
    "auto": pb.SIMILAR_SPACE_UNSPECIFIED,
    "mf": pb.SIMILAR_SPACE_MF,
    "content": pb.SIMILAR_SPACE_CONTENT,
    "sequence": pb.SIMILAR_SPACE_SEQUENCE,
}

KindLike = Union[str, int]
TimestampLike = Union[_dt.datetime, float, int, Timestamp, None]
FilterLike = Union["pb.Filter", Mapping[str, Any], None]
ItemLike = Union["pb.Item", Mapping[str, Any]]
Metadata = List[Tuple[str, str]]


@dataclass(frozen=True)
class TlsOptions:
    """TLS for the channel. All PEM bytes; None uses the system's roots.

    Attributes:
        root_certificates: CA certificates that sign the server's certificate.
        private_key: the client's key, for servers that require client certificates.
        certificate_chain: the client's certificate chain, with `private_key`.
        server_name: the name to check the server's certificate against when it differs
            from the target's host (e.g. connecting by IP to a cert issued for a name).
    """

    root_certificates: Optional[bytes] = None
    private_key: Optional[bytes] = None
    certificate_chain: Optional[bytes] = None
    server_name: Optional[str] = None


@dataclass(frozen=True)
class ConnectOptions:
    """How to reach the server.

    Attributes:
        target: ``host:port``.
        api_key: sent as ``x-api-key`` on every call when set.
        tls: TLS options; None is plaintext.
        timeout: default deadline of unary calls, in seconds (None: no deadline).
        channel_options: extra gRPC channel arguments.
        reconnect_backoff_ms: (initial, max) of the channel's own reconnect backoff; kept
            short so a restarted server is found again quickly.
        keepalive_ms: (interval, timeout) of HTTP/2 pings while calls are open, so a
            stream to a server that vanished without closing its connection (host down,
            network partition) breaks and is retried instead of waiting for acks forever.
    """

    target: str
    api_key: Optional[str] = None
    tls: Optional[TlsOptions] = None
    timeout: Optional[float] = 10.0
    channel_options: Sequence[Tuple[str, Any]] = field(default_factory=tuple)
    reconnect_backoff_ms: Tuple[int, int] = (100, 2000)
    keepalive_ms: Tuple[int, int] = (20_000, 10_000)

    def grpc_options(self, max_message_bytes: int = 16 * 1024 * 1024) -> List[Tuple[str, Any]]:
        """The channel arguments."""
        initial, maximum = self.reconnect_backoff_ms
        options: List[Tuple[str, Any]] = [
            ("grpc.initial_reconnect_backoff_ms", initial),
            ("grpc.max_reconnect_backoff_ms", maximum),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_ms[0]),
            ("grpc.keepalive_timeout_ms", self.keepalive_ms[1]),
            # Newer gRPC cores time the keepalive ping out by this one (60 s by default).
            ("grpc.http2.ping_timeout_ms", self.keepalive_ms[1]),
            # The producer retries itself, resending with the same event ids.
            ("grpc.enable_retries", 0),
        ]
        if self.tls is not None and self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        options.extend(self.channel_options)
        return options

    def credentials(self) -> Optional[Any]:
        """The channel credentials for TLS, None for plaintext."""
        if self.tls is None:
            return None
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=self.tls.root_certificates,
            private_key=self.tls.private_key,
            certificate_chain=self.tls.certificate_chain,
        )

    def metadata(self) -> Metadata:
        """Metadata sent with every call."""
        return [("x-api-key", self.api_key)] if self.api_key else []


def timestamp(value: TimestampLike) -> Timestamp:
    """A protobuf Timestamp from a datetime (naive means UTC), epoch seconds, or None (now)."""
    if isinstance(value, Timestamp):
        return value
    ts = Timestamp()
    if value is None:
        ts.FromNanoseconds(time.time_ns())
    elif isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        ts.FromDatetime(value.astimezone(_dt.timezone.utc))
    elif isinstance(value, (int, float)):
        ts.FromNanoseconds(int(value * 1_000_000_000))
    else:
        raise TypeError(
            f"timestamp must be a datetime, epoch seconds or None, not {type(value).__name__}"
        )
    return ts


def event_kind(kind: KindLike) -> int:
    """The EventKind value of a short name ("view", "purchase", ...) or an EventKind."""
    if isinstance(kind, str):
        try:
            return KINDS[kind.lower()]
        except KeyError:
            raise ValueError(f"unknown event kind {kind!r}; one of {sorted(KINDS)}") from None
    return int(kind)


def make_event(
    user_id: str,
    item_id: str,
    kind: KindLike = "view",
    *,
    event_id: Optional[str] = None,
    timestamp_: TimestampLike = None,
    custom_kind: Optional[str] = None,
    weight: Optional[float] = None,
    session_id: Optional[str] = None,
    value: Optional[float] = None,
    context: Optional[Mapping[str, str]] = None,
) -> "pb.Event":
    """An Event; a random event_id (uuid4) when none is given, now when no timestamp."""
    event = pb.Event(
        event_id=event_id if event_id is not None else uuid.uuid4().hex,
        user_id=user_id,
        item_id=item_id,
        kind=event_kind(kind),  # type: ignore[arg-type]
        timestamp=timestamp(timestamp_),
    )
    if custom_kind is not None:
        event.custom_kind = custom_kind
    if weight is not None:
        event.weight = weight
    if session_id is not None:
        event.session_id = session_id
    if value is not None:
        event.value = value
    if context:
        event.context.update(context)
    return event


def make_filter(value: FilterLike) -> Optional["pb.Filter"]:
    """A Filter from a Filter or a dict of its fields (include_categories, ...)."""
    if value is None or isinstance(value, pb.Filter):
        return value
    return pb.Filter(**dict(value))


def make_item(value: ItemLike) -> "pb.Item":
    """An Item from an Item or a dict of its fields (item_id, title, categories, ...)."""
    if isinstance(value, pb.Item):
        return value
    return pb.Item(**dict(value))


def similar_space(space: Union[str, int]) -> int:
    """The SimilarSpace of a short name ("auto", "mf", "content", "sequence") or a value."""
    if isinstance(space, str):
        try:
            return SPACES[space.lower()]
        except KeyError:
            raise ValueError(f"unknown similar space {space!r}; one of {sorted(SPACES)}") from None
    return int(space)


def events_of(events: Iterable[Union["pb.Event", Mapping[str, Any]]]) -> List["pb.Event"]:
    """Events from Events or dicts of make_event's arguments (``timestamp`` allowed)."""
    out: List[pb.Event] = []
    for e in events:
        if isinstance(e, pb.Event):
            out.append(e)
        else:
            args = dict(e)
            if "timestamp" in args:
                args["timestamp_"] = args.pop("timestamp")
            out.append(make_event(**args))
    return out
