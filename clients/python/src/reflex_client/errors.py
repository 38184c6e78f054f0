"""Typed exceptions: every failed call raises a ReflexError subclass named after its
gRPC status code, carrying the code, the server's details and its retry advice."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Type

import grpc

__all__ = [
    "ReflexError",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "FailedPrecondition",
    "Unauthenticated",
    "PermissionDenied",
    "ResourceExhausted",
    "Unavailable",
    "DeadlineExceeded",
    "Cancelled",
    "Aborted",
    "Internal",
    "Unimplemented",
    "ProducerClosed",
    "EventsRejected",
    "RejectedEvent",
    "from_rpc_error",
    "retry_pushback_ms",
]


class ReflexError(Exception):
    """A call to Reflex failed.

    Attributes:
        code: the gRPC status code (None when the failure never reached gRPC).
        details: the server's message.
        trailing_metadata: the call's trailers, as (key, value) pairs.
        retry_pushback_ms: the server's ``grpc-retry-pushback-ms`` advice, when it gave one.
    """

    code: Optional[grpc.StatusCode] = None

    def __init__(
        self,
        details: str,
        *,
        code: Optional[grpc.StatusCode] = None,
        trailing_metadata: Sequence[Tuple[str, str]] = (),
    ) -> None:
        if code is not None:
            self.code = code
        self.details = details
        self.trailing_metadata: List[Tuple[str, str]] = list(trailing_metadata)
        self.retry_pushback_ms = retry_pushback_ms(self.trailing_metadata)
        name = self.code.name if self.code is not None else "ERROR"
        super().__init__(f"{name}: {details}")


class InvalidArgument(ReflexError):
    """The request was invalid; the details name the field (INVALID_ARGUMENT)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ReflexError):
    """The user, item or version does not exist (NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ReflexError):
    """ALREADY_EXISTS."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ReflexError):
    """The server cannot do this in its current state (FAILED_PRECONDITION)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(ReflexError):
    """No API key, or an unknown one (UNAUTHENTICATED)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ReflexError):
    """The API key lacks the scope the method needs (PERMISSION_DENIED)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ReflexError):
    """Too big (a batch or message over the limits) or the server is at its call or
    stream limit; in the latter case ``retry_pushback_ms`` says when to retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ReflexError):
    """The server is unreachable, starting or draining (UNAVAILABLE); retryable."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ReflexError):
    """The call's deadline passed (DEADLINE_EXCEEDED)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ReflexError):
    """The call was cancelled (CANCELLED)."""

    code = grpc.StatusCode.CANCELLED


class Aborted(ReflexError):
    """ABORTED."""

    code = grpc.StatusCode.ABORTED


class Internal(ReflexError):
    """The server failed (INTERNAL, DATA_LOSS or UNKNOWN)."""

    code = grpc.StatusCode.INTERNAL


class Unimplemented(ReflexError):
    """The server does not have this method (UNIMPLEMENTED)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class ProducerClosed(ReflexError):
    """The producer was closed before the event could be sent, or send() came after close()."""


class RejectedEvent:
    """One event the server answered REJECTED (or FILTERED), with its reason."""

    __slots__ = ("event_id", "status", "reason")

    def __init__(self, event_id: str, status: str, reason: str) -> None:
        self.event_id = event_id
        self.status = status
        self.reason = reason

    def __repr__(self) -> str:
        return f"RejectedEvent({self.event_id!r}, {self.status}, {self.reason!r})"


class EventsRejected(ReflexError):
    """Events of a batch were rejected; ``rejected`` lists each with the server's reason
    (which names the field). Raised by ``ingest(..., raise_on_reject=True)`` and set on a
    producer future when the producer was made with ``raise_on_reject=True``."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, rejected: Sequence[RejectedEvent]) -> None:
        self.rejected: List[RejectedEvent] = list(rejected)
        shown = "; ".join(f"{r.event_id}: {r.reason}" for r in self.rejected[:5])
        more = f" (and {len(self.rejected) - 5} more)" if len(self.rejected) > 5 else ""
        super().__init__(f"{len(self.rejected)} event(s) rejected: {shown}{more}")


_BY_CODE: Dict[grpc.StatusCode, Type[ReflexError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Aborted,
        Internal,
        Unimplemented,
    )
    if cls.code is not None
}
_BY_CODE[grpc.StatusCode.DATA_LOSS] = Internal
_BY_CODE[grpc.StatusCode.UNKNOWN] = Internal


def retry_pushback_ms(metadata: Optional[Sequence[Tuple[str, object]]]) -> Optional[int]:
    """The ``grpc-retry-pushback-ms`` value in `metadata`: None when absent, a negative
    number when the server says not to retry."""
    for key, value in metadata or ():
        if key == "grpc-retry-pushback-ms":
            text = value.decode() if isinstance(value, bytes) else str(value)
            try:
                return int(text)
            except ValueError:
                return None
    return None


def from_status(
    code: grpc.StatusCode, details: str, trailing_metadata: Sequence[Tuple[str, str]] = ()
) -> ReflexError:
    """The typed exception for `code`."""
    cls = _BY_CODE.get(code, ReflexError)
    return cls(details, code=code, trailing_metadata=trailing_metadata)


def from_rpc_error(err: grpc.RpcError) -> ReflexError:
    """The typed exception for a grpc.RpcError (sync or asyncio)."""
    code_fn = getattr(err, "code", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details_fn = getattr(err, "details", None)
    details = (details_fn() if callable(details_fn) else None) or str(err)
    trailers_fn = getattr(err, "trailing_metadata", None)
    trailers = trailers_fn() if callable(trailers_fn) else None
    pairs: List[Tuple[str, str]] = []
    for item in trailers or ():
        key, value = item[0], item[1]
        pairs.append((key, value.decode(errors="replace") if isinstance(value, bytes) else value))
    return from_status(code, details, pairs)
