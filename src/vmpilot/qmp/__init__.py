"""QMP, the QEMU Machine Protocol: a sans-I/O core and two thin drivers."""

from ._client import CLIENT_TIMEOUT, DEFAULT_TIMEOUT
from .aio import AsyncQMPClient
from .events import match_data
from .protocol import ConnectionLost, ErrorReply, Event, Greeting, QMPProtocol, Reply
from .sync import QMPClient

__all__ = [
    "CLIENT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "AsyncQMPClient",
    "ConnectionLost",
    "ErrorReply",
    "Event",
    "Greeting",
    "QMPClient",
    "QMPProtocol",
    "Reply",
    "match_data",
]
