"""The serial console as a byte stream: drained continuously, matched
incrementally, failing at once when the VM goes away.

Split like `qmp`: `core` (patterns, the matching buffer; no I/O), `plans`
(each operation written once), and two thin faces, `sync.Console` (a reader
thread) and `aio.AsyncConsole` (a loop reader), that only supply the
primitives "wait for more data until a deadline" and "send bytes". Either
face drains the socket into a bounded buffer and a transcript file, so QEMU
never blocks on a full console socket.
"""

from ..errors import ConsoleClosed, ExpectTimeout
from .aio import MAX_UNSENT, AsyncConsole
from .core import (
    ANSI,
    DEFAULT_TIMEOUT,
    MAX_BUFFER,
    QUIET,
    TAIL,
    WINDOW,
    ConsoleBuffer,
    Match,
    PatternArg,
    Patterns,
    visible,
)
from .sync import Console

__all__ = [
    "ANSI",
    "DEFAULT_TIMEOUT",
    "MAX_BUFFER",
    "MAX_UNSENT",
    "QUIET",
    "TAIL",
    "WINDOW",
    "AsyncConsole",
    "Console",
    "ConsoleBuffer",
    "ConsoleClosed",
    "ExpectTimeout",
    "Match",
    "PatternArg",
    "Patterns",
    "visible",
]
