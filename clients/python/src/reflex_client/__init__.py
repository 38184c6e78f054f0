"""Python client for Reflex: an idempotent streaming :class:`Producer`, typed calls
(:class:`Client`, :class:`AsyncClient`) and typed errors (:mod:`reflex_client.errors`).

The message types are the generated protobuf classes, re-exported as :mod:`reflex_client.pb`.
"""

from . import errors
from ._common import ConnectOptions, TlsOptions, make_event, timestamp
from ._proto import reflex_pb2 as pb
from .aio import AsyncClient, AsyncProducer
from .client import Client
from .errors import ReflexError
from .producer import EventResult, EventStatus, Producer, ProducerStats

__all__ = [
    "AsyncClient",
    "AsyncProducer",
    "Client",
    "ConnectOptions",
    "EventResult",
    "EventStatus",
    "Producer",
    "ProducerStats",
    "ReflexError",
    "TlsOptions",
    "errors",
    "make_event",
    "pb",
    "timestamp",
]

__version__ = "0.1.0"
