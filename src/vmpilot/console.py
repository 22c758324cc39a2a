"""The serial console as a byte stream: drained continuously, matched
incrementally, failing at once when the VM goes away.

A reader (a thread for `Console`, a loop callback for `AsyncConsole`) drains
the socket into a bounded buffer and a transcript file, so QEMU never blocks
on a full console socket. `expect()` only scans bytes it has not scanned
before (plus a window for matches that straddle reads), so its cost is linear
in the bytes received, whatever their size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Union

from ._util.deadline import Deadline
from .errors import GuestError, Timeout

PatternArg = Union[str, bytes, "re.Pattern[str]", "re.Pattern[bytes]"]
Patterns = Union[PatternArg, Sequence[PatternArg]]  # noqa: UP007

log = logging.getLogger("vmpilot.console")

DEFAULT_TIMEOUT = 30.0
MAX_BUFFER = 4 * 1024 * 1024  # unconsumed bytes kept for matching
WINDOW = 8192  # longest match guaranteed to be found across reads
TAIL = 2048  # console output shown in failure messages

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
ANSI = re.compile(rb"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[()][A-Za-z0-9]|[=>78cDEHM])")


def visible(data: bytes) -> str:
    """Console bytes as text with control characters made visible."""
    text = data.decode(errors="replace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}" if m[0] != "\r" else "\\r", text)


def _compile(pattern: PatternArg) -> re.Pattern[bytes]:
    if isinstance(pattern, re.Pattern):
        if isinstance(pattern.pattern, bytes):
            return pattern
        return re.compile(pattern.pattern.encode(), pattern.flags & ~re.UNICODE)
    if isinstance(pattern, str):
        pattern = pattern.encode()
    if isinstance(pattern, bytes):
        return re.compile(re.escape(pattern))
    raise TypeError(f"a console pattern is a str, bytes or re.Pattern, not {pattern!r}")


def _compile_all(patterns: Patterns) -> list[re.Pattern[bytes]]:
    if isinstance(patterns, (str, bytes, re.Pattern)):
        patterns = [patterns]
    compiled = [_compile(p) for p in patterns]
    if not compiled:
        raise ValueError("expect() needs at least one pattern")
    return compiled


def _min(a: float, b: float | None) -> float:
    return a if b is None else min(a, b)


def _label(pattern: PatternArg) -> str:
    """A pattern as the user wrote it: literals as text, regexes as regex."""
    raw = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return repr(text) if not isinstance(pattern, re.Pattern) else f"re.compile({text!r})"


def _describe(patterns: Patterns) -> str:
    if isinstance(patterns, (str, bytes, re.Pattern)):
        patterns = [patterns]
    return ", ".join(_label(p) for p in patterns)


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
    """Sans-I/O matching state shared by both console flavours."""

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

    def tail(self) -> str:
        return visible(bytes(self.recent[-TAIL:]))


class ExpectTimeout(Timeout, GuestError):
    """The pattern did not show up on the console in time."""

    def __init__(self, message: str, what: str, timeout: float | None) -> None:
        Timeout.__init__(self, what, timeout)
        self.args = (message,)


class _ConsoleBase:
    def __init__(self, sock: socket.socket, transcript: str | None, name: str) -> None:
        self._sock: socket.socket | None = sock
        self.transcript_path = transcript
        self.name = name
        self._buf = ConsoleBuffer()
        self._transcript_fd = (
            os.open(transcript, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            if transcript
            else -1
        )
        self.closed_reason: str | None = None
        self.fail_patterns: list[PatternArg] = []
        # called with every chunk as it arrives (from the reader), e.g. to
        # mirror the console on a terminal; expect() still sees everything
        self.listeners: list[Callable[[bytes], object]] = []

    @property
    def received(self) -> int:
        """Bytes received since the console opened."""
        return self._buf.total

    def tail(self) -> str:
        """The last ~2 KiB received, control characters made visible."""
        return self._buf.tail()

    def _on_data(self, chunk: bytes) -> None:
        for listener in self.listeners:
            try:
                listener(chunk)
            except Exception:
                log.exception("console listener %r failed", listener)
        self._buf.feed(chunk)
        if self._transcript_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self._transcript_fd, chunk)

    def _close_transcript(self) -> None:
        if self._transcript_fd >= 0:
            os.close(self._transcript_fd)
            self._transcript_fd = -1

    def _failure(self, what: str, patterns: str, timeout: float | None) -> str:
        where = f"\ntranscript: {self.transcript_path}" if self.transcript_path else ""
        limit = f" within {timeout:g} s" if timeout is not None else ""
        return (
            f"{what}{limit} while expecting {patterns} on {self.name}; "
            f"last console output:\n{self.tail()}{where}"
        )

    def _check(
        self,
        patterns: list[re.Pattern[bytes]],
        fail: list[re.Pattern[bytes]],
        scanned: int,
        timeout: float | None,
        label: str,
    ) -> Match | None:
        found = self._buf.search(patterns + fail, scanned)
        if found is None:
            return None
        index, m = found
        if index >= len(patterns):
            seen = visible(m[0])
            self._buf.consume(m.end())
            raise GuestError(self._failure(f"failure pattern matched {seen!r}", label, None))
        found_match = Match(index, m, bytes(self._buf.data[: m.start()]))
        self._buf.consume(m.end())
        return found_match

    def _prepare(
        self, patterns: Patterns, fail: Patterns | None
    ) -> tuple[list[re.Pattern[bytes]], list[re.Pattern[bytes]]]:
        pats = _compile_all(patterns)
        fails = [_compile(p) for p in self.fail_patterns]
        if fail is not None:
            fails += _compile_all(fail)
        return pats, fails

    def _check_settle_deadline(self, deadline: Deadline, quiet: float, timeout: float) -> None:
        if deadline.expired:
            raise ExpectTimeout(
                f"console of {self.name} did not go quiet for {quiet:g} s within {timeout:g} s; "
                f"last console output:\n{self.tail()}",
                "a quiet console",
                timeout,
            )

    def _encode(self, data: str | bytes) -> bytes:
        return data.encode() if isinstance(data, str) else data


class Console(_ConsoleBase):
    """The serial console of a running VM, for blocking code (thread-safe)."""

    def __init__(self, sock: socket.socket, transcript: str | None = None, name: str = "console"):
        super().__init__(sock, transcript, name)
        sock.setblocking(True)
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"vmpilot-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        sock = self._sock
        assert sock is not None
        reason = "the VM closed the console"
        while True:
            try:
                chunk = sock.recv(65536)  # ends at EOF: QEMU exited or close() shut it down
            except OSError as exc:
                reason = f"console read failed: {exc}"
                break
            if not chunk:
                break
            with self._cond:
                self._on_data(chunk)
                self._cond.notify_all()
        with self._cond:
            if self.closed_reason is None:
                self.closed_reason = reason
            self._cond.notify_all()

    def expect(
        self,
        patterns: Patterns,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        fail: Patterns | None = None,
    ) -> Match:
        """Wait for the first of `patterns` (literal str/bytes, or compiled
        regex) and consume the output up to its end. A `fail` pattern (or one
        of `fail_patterns`) seen first raises `GuestError` at once, and so does
        the console closing (the VM died)."""
        pats, fails = self._prepare(patterns, fail)
        label = _describe(patterns)
        deadline = Deadline(timeout)
        with self._cond:
            scanned = max(0, self._buf.total - len(self._buf.data))
            while True:
                found = self._check(pats, fails, scanned, timeout, label)
                if found is not None:
                    return found
                scanned = self._buf.total
                if self.closed_reason is not None:
                    raise GuestError(self._failure(f"console closed ({self.closed_reason})",
                                                   label, None))  # fmt: skip
                remaining = deadline.remaining()
                if remaining == 0:
                    raise ExpectTimeout(self._failure("not seen", label, timeout), label, timeout)
                self._cond.wait(remaining)

    def read_until(self, pattern: PatternArg, timeout: float | None = DEFAULT_TIMEOUT) -> str:
        """The text up to and including `pattern` (consumed)."""
        m = self.expect(pattern, timeout)
        return (m.before + m.matched).decode(errors="replace")

    def settle(self, quiet: float = 0.5, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Wait until nothing arrives for `quiet` seconds; return (and consume)
        everything pending. Raises `ExpectTimeout` if it never goes quiet."""
        deadline = Deadline(timeout)
        with self._cond:
            seen, since = self._buf.total, time.monotonic()
            while True:
                now = time.monotonic()
                if self._buf.total != seen:
                    seen, since = self._buf.total, now
                if now - since >= quiet or self.closed_reason is not None:
                    return self._buf.consume(len(self._buf.data)).decode(errors="replace")
                self._check_settle_deadline(deadline, quiet, timeout)
                self._cond.wait(_min(quiet - (now - since), deadline.remaining()))

    def send(self, data: str | bytes) -> None:
        """Type `data` into the console."""
        sock = self._sock
        if sock is None or self.closed_reason is not None:
            raise GuestError(f"cannot send to {self.name}: console closed ({self.closed_reason})")
        try:
            sock.sendall(self._encode(data))
        except OSError as exc:
            raise GuestError(f"cannot send to {self.name}: {exc}") from exc

    def send_line(self, line: str | bytes) -> None:
        self.send(self._encode(line) + b"\n")

    def close(self) -> None:
        """Stop reading; a waiting `expect` fails at once. Idempotent."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with self._cond:
            if self.closed_reason is None:
                self.closed_reason = "closed by vmpilot"
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes the reader's recv()
        if self._reader is not threading.current_thread():
            self._reader.join(10)
        sock.close()
        self._close_transcript()


class AsyncConsole(_ConsoleBase):
    """The serial console for asyncio code; read by a loop callback."""

    def __init__(self, sock: socket.socket, transcript: str | None = None, name: str = "console"):
        super().__init__(sock, transcript, name)
        sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._read)

    def _read(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            chunk = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._hangup(f"console read failed: {exc}")
            return
        if not chunk:
            self._hangup("the VM closed the console")
            return
        self._on_data(chunk)
        self._changed.set()

    def _hangup(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
        self._loop.remove_reader(self._fd)
        self._changed.set()

    async def _wait_change(self, timeout: float | None) -> None:
        self._changed.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def expect(
        self,
        patterns: Patterns,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        fail: Patterns | None = None,
    ) -> Match:
        """See `Console.expect`."""
        pats, fails = self._prepare(patterns, fail)
        label = _describe(patterns)
        deadline = Deadline(timeout)
        scanned = max(0, self._buf.total - len(self._buf.data))
        while True:
            found = self._check(pats, fails, scanned, timeout, label)
            if found is not None:
                return found
            scanned = self._buf.total
            if self.closed_reason is not None:
                raise GuestError(
                    self._failure(f"console closed ({self.closed_reason})", label, None)
                )
            remaining = deadline.remaining()
            if remaining == 0:
                raise ExpectTimeout(self._failure("not seen", label, timeout), label, timeout)
            await self._wait_change(remaining)

    async def read_until(self, pattern: PatternArg, timeout: float | None = DEFAULT_TIMEOUT) -> str:
        m = await self.expect(pattern, timeout)
        return (m.before + m.matched).decode(errors="replace")

    async def settle(self, quiet: float = 0.5, timeout: float = DEFAULT_TIMEOUT) -> str:
        """See `Console.settle`."""
        deadline = Deadline(timeout)
        seen, since = self._buf.total, time.monotonic()
        while True:
            now = time.monotonic()
            if self._buf.total != seen:
                seen, since = self._buf.total, now
            if now - since >= quiet or self.closed_reason is not None:
                return self._buf.consume(len(self._buf.data)).decode(errors="replace")
            self._check_settle_deadline(deadline, quiet, timeout)
            await self._wait_change(_min(quiet - (now - since), deadline.remaining()))

    def send(self, data: str | bytes) -> None:
        """Type `data` into the console (small writes; no await needed)."""
        sock = self._sock
        if sock is None or self.closed_reason is not None:
            raise GuestError(f"cannot send to {self.name}: console closed ({self.closed_reason})")
        payload = self._encode(data)
        try:
            sent = sock.send(payload)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise GuestError(f"cannot send to {self.name}: {exc}") from exc
        if sent < len(payload):
            raise GuestError(f"console of {self.name} is not accepting input (buffer full)")

    def send_line(self, line: str | bytes) -> None:
        self.send(self._encode(line) + b"\n")

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._hangup("closed by vmpilot")
        sock.close()
        self._close_transcript()
