"""The idempotent streaming producer over ``EventService.Stream``.

Events are gathered into batches (``max_batch`` events or ``linger_ms`` after the first,
whichever comes first). Each sealed batch gets a sequence number and joins the window of
at most ``max_in_flight`` unacknowledged batches; the server answers one ack per batch, in
order, with one status per event, and each event's future resolves with it. When the
stream breaks (server killed, restarted, draining, UNAVAILABLE) the producer opens a new
stream and sends every unacknowledged batch again with the same event ids: an event the
server had applied before the break comes back DUPLICATE, so nothing is applied twice and
nothing is lost. Retries are bounded (``max_retries`` in a row without an ack) with
exponential backoff, or the server's ``grpc-retry-pushback-ms`` when it gives one. When the
window is full, ``send`` blocks: that is the backpressure.
"""

from __future__ import annotations

import enum
import logging
import random
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Iterator, List, Mapping, Optional, Tuple, Union

import grpc

from . import errors
from ._common import ConnectOptions, KindLike, TimestampLike, make_event
from ._proto import reflex_pb2 as pb
from ._proto import reflex_pb2_grpc as pb_grpc

__all__ = ["Producer", "EventResult", "EventStatus", "ProducerStats"]

log = logging.getLogger("reflex_client.producer")


class EventStatus(str, enum.Enum):
    """What the server did with one event."""

    ACCEPTED = "ACCEPTED"
    """Durably recorded, applied to the profile and seen by the model."""
    DUPLICATE = "DUPLICATE"
    """Its event_id was already accepted (e.g. before a reconnect); nothing changed."""
    REJECTED = "REJECTED"
    """Invalid; ``reason`` names the field. Nothing was recorded."""
    FILTERED = "FILTERED"
    """Recorded for audit but judged bot or noise traffic."""
    UNSPECIFIED = "UNSPECIFIED"
    """The server sent no status (a newer server, or a bug)."""


_STATUS = {
    pb.EVENT_STATUS_ACCEPTED: EventStatus.ACCEPTED,
    pb.EVENT_STATUS_DUPLICATE: EventStatus.DUPLICATE,
    pb.EVENT_STATUS_REJECTED: EventStatus.REJECTED,
    pb.EVENT_STATUS_FILTERED: EventStatus.FILTERED,
}


@dataclass(frozen=True)
class EventResult:
    """The server's answer for one event."""

    event_id: str
    status: EventStatus
    reason: str = ""

    @property
    def applied(self) -> bool:
        """Whether the event is in the server's state: ACCEPTED now or DUPLICATE (accepted
        earlier, e.g. before a reconnect)."""
        return self.status in (EventStatus.ACCEPTED, EventStatus.DUPLICATE)


def result_of(r: "pb.EventResult") -> EventResult:
    """The EventResult of a wire EventResult."""
    return EventResult(r.event_id, _STATUS.get(r.status, EventStatus.UNSPECIFIED), r.reason)


@dataclass
class ProducerStats:
    """Counters of one producer."""

    events_sent: int = 0
    batches_acked: int = 0
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    filtered: int = 0
    failed: int = 0
    """Events whose future got an exception."""
    streams_opened: int = 0
    batches_resent: int = 0
    """Batches sent again on a new stream after a break."""
    retries: int = 0
    last_pushback_ms: Optional[int] = None
    """The server's latest ``grpc-retry-pushback-ms`` advice, when it gave one."""


class _Batch:
    __slots__ = ("seq", "request", "futures", "sends")

    def __init__(self, seq: int, events: List["pb.Event"], futures: List["Future[EventResult]"]):
        self.seq = seq
        self.request = pb.IngestRequest(sequence=seq, events=events)
        self.futures = futures
        self.sends = 0


class _StreamToken:
    """Tells one stream's request generator to stop."""

    __slots__ = ("stopped",)

    def __init__(self) -> None:
        self.stopped = False


# Codes after which the stream is opened again and the unacknowledged batches resent.
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
# Codes no retry can fix: every pending event fails and the producer stops.
_FATAL = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,
}


class Producer:
    """Streams events to Reflex with batching, a bounded window, per-event futures and
    exactly-once resends across reconnects. Thread-safe; use as a context manager or call
    :meth:`close`.

    Args:
        options: where and how to connect (ignored for the connection when `channel` is
            given, but its API key is still sent).
        channel: an existing channel to use (not closed by the producer).
        max_batch: most events per batch (the server's default limit is 1000).
        linger_ms: longest an event waits for its batch to fill before it is sent.
        max_in_flight: most batches sent and not yet acknowledged; ``send`` blocks beyond.
        max_retries: stream failures in a row (no ack in between) before every pending
            event (sent or queued) fails with the last error; the producer stays usable.
        backoff_initial_ms, backoff_max_ms: exponential backoff between retries (with
            jitter), unless the server advised ``grpc-retry-pushback-ms``.
        raise_on_reject: set :class:`~reflex_client.errors.EventsRejected` on the
            futures of REJECTED events instead of resolving them with the result.
    """

    def __init__(
        self,
        options: ConnectOptions,
        *,
        channel: Optional[grpc.Channel] = None,
        max_batch: int = 500,
        linger_ms: float = 5.0,
        max_in_flight: int = 8,
        max_retries: int = 10,
        backoff_initial_ms: float = 50.0,
        backoff_max_ms: float = 2000.0,
        raise_on_reject: bool = False,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1 or max_retries < 0 or linger_ms < 0:
            raise ValueError(
                "max_batch and max_in_flight must be >= 1, max_retries and linger_ms >= 0"
            )
        self._options = options
        self._own_channel = channel is None
        if channel is None:
            creds = options.credentials()
            opts = options.grpc_options()
            channel = (
                grpc.secure_channel(options.target, creds, options=opts)
                if creds is not None
                else grpc.insecure_channel(options.target, options=opts)
            )
        self._channel = channel
        self._stub = pb_grpc.EventServiceStub(channel)
        self._metadata = options.metadata()
        self.max_batch = max_batch
        self.linger = linger_ms / 1000.0
        self.max_in_flight = max_in_flight
        self.max_retries = max_retries
        self.backoff_initial = backoff_initial_ms / 1000.0
        self.backoff_max = backoff_max_ms / 1000.0
        self.raise_on_reject = raise_on_reject

        self._cond = threading.Condition()
        self._open: List[Tuple["pb.Event", "Future[EventResult]"]] = []
        self._open_since = 0.0
        self._window: "OrderedDict[int, _Batch]" = OrderedDict()
        self._next_seq = 1
        self._flushing = 0
        self._closed = False
        self._aborted = False
        self._fatal: Optional[errors.ReflexError] = None
        self._call: Optional[Any] = None
        self.stats = ProducerStats()
        self._thread = threading.Thread(target=self._run, name="reflex-producer", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- public API

    def send(
        self,
        event: Union["pb.Event", Mapping[str, Any], None] = None,
        *,
        user_id: Optional[str] = None,
        item_id: Optional[str] = None,
        kind: KindLike = "view",
        event_id: Optional[str] = None,
        timestamp: TimestampLike = None,
        timeout: Optional[float] = None,
        **fields: Any,
    ) -> "Future[EventResult]":
        """Queues one event and returns the future of its result.

        Give an ``Event``, a dict of its fields, or keywords (``user_id``, ``item_id``,
        ``kind`` ("view", "click", "add_to_cart", "remove_from_cart", "purchase",
        "custom"), ``event_id`` (a random one when absent), ``timestamp`` (now when
        absent), ``custom_kind``, ``weight``, ``session_id``, ``value``, ``context``).
        Keep the event_id of an event you may send again: the server answers a repeat
        DUPLICATE. Blocks while the window is full, at most `timeout` seconds (None:
        without limit), then raises :class:`~reflex_client.errors.ResourceExhausted`.
        """
        if event is None:
            if user_id is None or item_id is None:
                raise TypeError("send() needs an event or user_id and item_id")
            event = make_event(
                user_id, item_id, kind, event_id=event_id, timestamp_=timestamp, **fields
            )
        elif not isinstance(event, pb.Event):
            args = dict(event)
            if "timestamp" in args:
                args["timestamp_"] = args.pop("timestamp")
            event = make_event(**args)
        fut: "Future[EventResult]" = Future()
        fut.set_running_or_notify_cancel()  # not cancellable: it may already be on the wire
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._check_usable()
            while len(self._open) >= self.max_batch:
                if len(self._window) < self.max_in_flight:
                    self._seal_locked()
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise errors.ResourceExhausted(
                        f"producer window full ({self.max_in_flight} batches of "
                        f"{self.max_batch} unacknowledged) for {timeout}s",
                        code=None,
                    )
                self._cond.wait(remaining)
                self._check_usable()
            if not self._open:
                self._open_since = time.monotonic()
            self._open.append((event, fut))
            self.stats.events_sent += 1
            if len(self._open) >= self.max_batch and len(self._window) < self.max_in_flight:
                self._seal_locked()
            self._cond.notify_all()
        return fut

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Sends what is queued now without waiting for linger and waits until every
        event queued before the call has its result. False when `timeout` passed first."""
        with self._cond:
            pending = [f for _, f in self._open]
            for batch in self._window.values():
                pending.extend(batch.futures)
            self._flushing += 1
            self._cond.notify_all()
        try:
            return _wait_all(pending, timeout)
        finally:
            with self._cond:
                self._flushing -= 1

    def close(self, timeout: Optional[float] = None) -> None:
        """Sends everything queued, waits for the acks (at most `timeout` seconds), ends
        the stream and closes the channel the producer made. Events still pending after
        `timeout` fail with :class:`~reflex_client.errors.ProducerClosed`. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                self._aborted = True
                call = self._call
                self._cond.notify_all()
            if call is not None:
                call.cancel()
            self._thread.join()
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pending(self) -> int:
        """Events queued or unacknowledged."""
        with self._cond:
            return len(self._open) + sum(len(b.futures) for b in self._window.values())

    # ----------------------------------------------------------------- internals

    def _check_usable(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closed:
            raise errors.ProducerClosed("send() after close()")

    def _seal_locked(self) -> None:
        """Turns the open batch into a numbered batch of the window."""
        take = self._open[: self.max_batch]
        del self._open[: self.max_batch]
        seq = self._next_seq
        self._next_seq += 1
        self._window[seq] = _Batch(seq, [e for e, _ in take], [f for _, f in take])
        if self._open:
            self._open_since = time.monotonic()
        self._cond.notify_all()

    def _requests(self, token: _StreamToken) -> Iterator["pb.IngestRequest"]:
        """One stream's requests: first every unacknowledged batch again, then new ones
        as they are sealed; ends (half-closing the stream) once closed and drained."""
        sent_upto = 0
        while True:
            with self._cond:
                while True:
                    if token.stopped or self._aborted:
                        return
                    now = time.monotonic()
                    if (
                        self._open
                        and len(self._window) < self.max_in_flight
                        and (
                            self._closed
                            or self._flushing
                            or len(self._open) >= self.max_batch
                            or now - self._open_since >= self.linger
                        )
                    ):
                        self._seal_locked()
                    batch = next((b for s, b in self._window.items() if s > sent_upto), None)
                    if batch is not None:
                        break
                    if self._closed and not self._window and not self._open:
                        return
                    wait = None
                    if self._open and len(self._window) < self.max_in_flight:
                        wait = max(0.0, self._open_since + self.linger - now)
                    self._cond.wait(wait)
                if batch.sends:
                    self.stats.batches_resent += 1
                batch.sends += 1
                sent_upto = batch.seq
            yield batch.request

    def _on_ack(self, ack: "pb.IngestResponse") -> None:
        with self._cond:
            batch = self._window.pop(ack.sequence, None)
            if batch is None:
                log.warning("ack for unknown batch %d ignored", ack.sequence)
                return
            self.stats.batches_acked += 1
            self._cond.notify_all()
        results = [result_of(r) for r in ack.results]
        counts = {s: 0 for s in EventStatus}
        for i, fut in enumerate(batch.futures):
            if i >= len(results):
                self._fail(
                    [fut],
                    errors.Internal(
                        f"the ack of batch {ack.sequence} has {len(results)} results for "
                        f"{len(batch.futures)} events"
                    ),
                )
                continue
            result = results[i]
            counts[result.status] += 1
            if result.status is EventStatus.REJECTED and self.raise_on_reject:
                fut.set_exception(
                    errors.EventsRejected(
                        [errors.RejectedEvent(result.event_id, result.status.value, result.reason)]
                    )
                )
            else:
                fut.set_result(result)
        with self._cond:
            self.stats.accepted += counts[EventStatus.ACCEPTED]
            self.stats.duplicate += counts[EventStatus.DUPLICATE]
            self.stats.rejected += counts[EventStatus.REJECTED]
            self.stats.filtered += counts[EventStatus.FILTERED]

    def _fail(self, futures: List["Future[EventResult]"], err: BaseException) -> None:
        for fut in futures:
            if not fut.done():
                fut.set_exception(err)
        with self._cond:
            self.stats.failed += len(futures)

    def _take_window_locked(self, include_open: bool) -> List["Future[EventResult]"]:
        futures: List[Future[EventResult]] = []
        for batch in self._window.values():
            futures.extend(batch.futures)
        self._window.clear()
        if include_open:
            futures.extend(f for _, f in self._open)
            self._open.clear()
        self._cond.notify_all()
        return futures

    def _backoff(self, attempt: int, pushback_ms: Optional[int]) -> float:
        if pushback_ms is not None and pushback_ms >= 0:
            return pushback_ms / 1000.0
        base = min(self.backoff_max, self.backoff_initial * float(2 ** (attempt - 1)))
        return base * (0.5 + random.random() / 2)

    def _run(self) -> None:
        """Opens streams while there is something to send, handling their failures."""
        failures = 0
        while True:
            with self._cond:
                while not (self._open or self._window or self._closed or self._aborted):
                    self._cond.wait()
                if self._aborted or (self._closed and not self._open and not self._window):
                    break
            token = _StreamToken()
            acked_before = self.stats.batches_acked
            error: Optional[errors.ReflexError] = None
            call = self._stub.Stream(self._requests(token), metadata=self._metadata or None)
            with self._cond:
                self._call = call
                self.stats.streams_opened += 1
            try:
                for ack in call:
                    self._on_ack(ack)
                    failures = 0
            except grpc.RpcError as err:
                error = errors.from_rpc_error(err)
            finally:
                with self._cond:
                    token.stopped = True
                    self._call = None
                    self._cond.notify_all()
            with self._cond:
                if self._aborted:
                    break
                if error is None and not (self._window or self._open):
                    continue  # our half-close after close(), or a drained idle stream
            if error is None:
                # The server ended the stream (draining) with events still to deliver.
                error = errors.Unavailable(
                    "the server ended the event stream with events unacknowledged"
                )
            pushback = error.retry_pushback_ms
            code = error.code
            if code in _FATAL:
                with self._cond:
                    self._fatal = error
                    futures = self._take_window_locked(include_open=True)
                self._fail(futures, error)
                break
            retryable = (
                code in _RETRYABLE
                or code is None
                or (
                    code == grpc.StatusCode.RESOURCE_EXHAUSTED
                    and pushback is not None
                    and pushback >= 0
                )
            )
            if not retryable:
                # The server refused the oldest unacknowledged batch (too big, undecodable):
                # fail it and send the rest again on a new stream. With no batch sent yet,
                # the stream itself was refused: that counts as a failed attempt below.
                with self._cond:
                    head = next(iter(self._window.values()), None)
                    if head is not None:
                        del self._window[head.seq]
                        self._cond.notify_all()
                if head is not None:
                    self._fail(head.futures, error)
                    continue
            if self.stats.batches_acked > acked_before:
                failures = 0
            failures += 1
            with self._cond:
                self.stats.retries += 1
                if pushback is not None:
                    self.stats.last_pushback_ms = pushback
            if failures > self.max_retries:
                log.warning("giving up after %d attempts: %s", failures - 1, error)
                with self._cond:
                    futures = self._take_window_locked(include_open=True)
                self._fail(futures, error)
                failures = 0
                continue
            delay = self._backoff(failures, pushback)
            log.info("event stream failed (%s); retry %d in %.0f ms", error, failures, delay * 1000)
            deadline = time.monotonic() + delay
            with self._cond:
                while not self._aborted:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
        # Aborted (close timed out) or fatal: nothing more will be sent.
        with self._cond:
            futures = self._take_window_locked(include_open=True)
        if futures:
            self._fail(
                futures,
                self._fatal
                or errors.ProducerClosed("producer closed before the events were acknowledged"),
            )


def _wait_all(futures: List["Future[EventResult]"], timeout: Optional[float]) -> bool:
    from concurrent.futures import wait

    if not futures:
        return True
    _, not_done = wait(futures, timeout=timeout)
    return not not_done
