"""The QEMU guest agent (qemu-ga): split like `qmp`.

`core` holds the framing and (re)synchronisation (no I/O), `plans` each
operation written once (`exec` and its status polling, file transfer, the
exchange itself), and `sync.GuestAgent` / `aio.AsyncGuestAgent` are thin
faces that only supply the primitives: send bytes, wait for input, sleep.
"""

from ..errors import AgentError, AgentGone, AgentTimeout
from .aio import AsyncGuestAgent
from .core import CHUNK, DEFAULT_TIMEOUT, MAX_LINE, AgentProtocol, AgentState, ExecResult
from .sync import GuestAgent

__all__ = [
    "CHUNK",
    "DEFAULT_TIMEOUT",
    "MAX_LINE",
    "AgentError",
    "AgentGone",
    "AgentProtocol",
    "AgentState",
    "AgentTimeout",
    "AsyncGuestAgent",
    "ExecResult",
    "GuestAgent",
]
