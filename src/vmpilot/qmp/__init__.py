"""QMP, the QEMU Machine Protocol: a sans-I/O core and two thin drivers."""

from .aio import AsyncQMPClient
from .events import match_data
from .protocol import ErrorReply, Event, Greeting, QMPProtocol, Reply
from .sync import QMPClient

__all__ = [
    "AsyncQMPClient",
    "ErrorReply",
    "Event",
    "Greeting",
    "QMPClient",
    "QMPProtocol",
    "Reply",
    "match_data",
]
