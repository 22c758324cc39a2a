"""The console's I/O-free core: patterns, the matching buffer, matches.

`expect()` only scans bytes it has not scanned before (plus a window for
matches that straddle reads), so its cost is linear in the bytes received,
whatever their size.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Union

PatternArg = Union[str, bytes, "re.Pattern[str]", "re.Pattern[bytes]"]
Patterns = Union[PatternArg, Sequence[PatternArg]]  # noqa: UP007

DEFAULT_TIMEOUT = 30.0  # seconds an expect/settle waits unless told otherwise
QUIET = 0.5  # seconds of silence that make `settle()` return
MAX_BUFFER = 4 * 1024 * 1024  # unconsumed bytes kept for matching
WINDOW = 8192  # longest match guaranteed to be found across reads
TAIL = 2048  # console output shown in failure messages

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
ANSI = re.compile(rb"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[()][A-Za-z0-9]|[=>78cDEHM])")


# A kernel panic, as the kernel prints it (at a line start, maybe after a
# printk timestamp): an echoed command line that mentions it does not match.
PANIC = re.compile(rb"(?m)^(?:\[[ \d.]+\] )?Kernel panic - not syncing: [^\r\n]*")


def visible(data: bytes | str) -> str:
    """Console output as text with control characters escaped (`\\x1b`), so
    that a terminal showing it never acts on them (busybox's `ESC[6n` would
    make it answer into the user's next prompt)."""
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}" if m[0] != "\r" else "\\r", text)


def panic_line(text: str) -> str:
    """The kernel's last panic line in console output ("" if there is none)."""
    found = PANIC.findall(text.encode(errors="replace"))
    return found[-1].decode(errors="replace").strip() if found else ""


def compile_pattern(pattern: PatternArg) -> re.Pattern[bytes]:
    """A pattern as a bytes regex: str/bytes are literals (str as UTF-8)."""
    if isinstance(pattern, re.Pattern):
        if isinstance(pattern.pattern, bytes):
            return pattern
        return re.compile(pattern.pattern.encode(), pattern.flags & ~re.UNICODE)
    if isinstance(pattern, str):
        pattern = pattern.encode()
    if isinstance(pattern, bytes):
        return re.compile(re.escape(pattern))
    raise TypeError(f"a console pattern is a str, bytes or re.Pattern, not {pattern!r}")


def _as_list(patterns: Patterns) -> list[PatternArg]:
    if isinstance(patterns, (str, bytes, re.Pattern)):
        return [patterns]
    return list(patterns)


def compile_all(patterns: Patterns) -> list[re.Pattern[bytes]]:
    compiled = [compile_pattern(p) for p in _as_list(patterns)]
    if not compiled:
        raise ValueError("expect() needs at least one pattern")
    return compiled


def _label(pattern: PatternArg) -> str:
    """A pattern as the user wrote it: literals as text, regexes as regex."""
    raw = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return repr(text) if not isinstance(pattern, re.Pattern) else f"re.compile({text!r})"


def describe(patterns: Patterns) -> str:
    return ", ".join(_label(p) for p in _as_list(patterns))


class Match:
    """What `expect()` found: which pattern (`index`), the matched bytes and
    groups, and the output before the match (all copied out of the buffer)."""

    __slots__ = ("_groups", "_named", "before", "index", "matched")

    def __init__(self, index: int, m: re.Match[bytes], before: bytes) -> None:
        self.index = index
        self.matched: bytes = m[0]
        self._groups = m.groups()
        self._named = m.groupdict()
        self.before = before

    @property
    def text(self) -> str:
        return self.matched.decode(errors="replace")

    def group(self, n: int | str = 0) -> str:
        """Group `n` of the regex as text ("" when it did not take part)."""
        if n == 0:
            return self.text
        g = self._named[n] if isinstance(n, str) else self._groups[n - 1]
        return g.decode(errors="replace") if g is not None else ""

    def __repr__(self) -> str:
        return f"Match(index={self.index}, text={self.text!r})"


class ConsoleBuffer:
    """Sans-I/O matching state shared by both console faces."""

    def __init__(self, max_buffer: int = MAX_BUFFER, window: int = WINDOW) -> None:
        self.data = bytearray()
        self.total = 0  # bytes received in all
        self.max_buffer = max_buffer
        self.window = window
        self.recent = bytearray()  # the last TAIL bytes, consumed or not

    def feed(self, chunk: bytes) -> None:
        self.data += chunk
        self.total += len(chunk)
        self.recent += chunk
        if len(self.recent) > 2 * TAIL:
            del self.recent[:-TAIL]
        if len(self.data) > self.max_buffer:
            del self.data[: len(self.data) - self.max_buffer]

    @property
    def scanned_before(self) -> int:
        """`total` as it was before the bytes still buffered arrived."""
        return max(0, self.total - len(self.data))

    def search(
        self, patterns: Sequence[re.Pattern[bytes]], scanned_total: int
    ) -> tuple[int, re.Match[bytes]] | None:
        """Earliest match of any pattern among bytes not scanned before
        (`scanned_total` = `self.total` at the previous scan)."""
        unscanned = self.total - scanned_total
        start = max(0, len(self.data) - unscanned - self.window)
        best: tuple[int, re.Match[bytes]] | None = None
        for i, pattern in enumerate(patterns):
            m = pattern.search(self.data, start)
            if m is not None and (best is None or m.start() < best[1].start()):
                best = (i, m)
        return best

    def consume(self, end: int) -> bytes:
        taken = bytes(self.data[:end])
        del self.data[:end]
        return taken

    def take_all(self) -> str:
        return self.consume(len(self.data)).decode(errors="replace")

    def tail(self) -> str:
        return visible(bytes(self.recent[-TAIL:]))
