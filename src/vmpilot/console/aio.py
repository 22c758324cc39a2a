"""The console for asyncio code: a loop reader drains the socket, a loop
writer flushes what the socket did not take at once."""

from __future__ import annotations

import asyncio
import socket
from typing import TypeVar

from .._util.deadline import Deadline, Within
from .._util.plan import Plan, arun
from ..errors import ConsoleClosed, GuestError
from . import plans
from ._base import ConsoleBase, _encode
from .core import DEFAULT_TIMEOUT, QUIET, Match, PatternArg, Patterns

T = TypeVar("T")

MAX_UNSENT = 1024 * 1024  # input `send()` buffers while the guest is not reading


class AsyncConsole(ConsoleBase):
    """The serial console for asyncio code; read by a loop callback."""

    def __init__(self, sock: socket.socket, transcript: str | None = None, name: str = "console"):
        super().__init__(sock, transcript, name)
        sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._fd = sock.fileno()
        self._unsent = bytearray()
        self._send_error: str | None = None
        self._loop.add_reader(self._fd, self._read)

    # -- operations (written once, in `plans`) ------------------------------

    async def expect(
        self,
        patterns: Patterns,
        *,
        fail: Patterns | None = None,
        timeout: Within = DEFAULT_TIMEOUT,
    ) -> Match:
        """See `Console.expect`."""
        return await self._perform(plans.expect(self, patterns, fail, Deadline.of(timeout)))

    async def read_until(self, pattern: PatternArg, *, timeout: Within = DEFAULT_TIMEOUT) -> str:
        """See `Console.read_until`."""
        return await self._perform(plans.read_until(self, pattern, Deadline.of(timeout)))

    async def settle(self, quiet: float = QUIET, *, timeout: Within = DEFAULT_TIMEOUT) -> str:
        """See `Console.settle`."""
        return await self._perform(plans.settle(self, quiet, Deadline.of(timeout)))

    def send(self, data: str | bytes) -> None:
        """Type `data` into the console, no await needed: what the socket does
        not take now is kept (up to `MAX_UNSENT` bytes) and sent in order as
        the guest reads; past that bound `GuestError`, and nothing is sent."""
        sock = self._open_socket()
        if self._send_error is not None:
            raise ConsoleClosed(f"cannot send to {self.name}: {self._send_error}")
        payload = _encode(data)
        if len(self._unsent) + len(payload) > MAX_UNSENT:
            raise GuestError(
                f"console of {self.name} is not reading its input: {len(self._unsent)} bytes "
                f"still unsent, {len(payload)} more would pass the {MAX_UNSENT}-byte bound"
            )
        if not self._unsent:
            try:
                sent = sock.send(payload)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                raise ConsoleClosed(f"cannot send to {self.name}: {exc}") from exc
            payload = payload[sent:]
            if payload:
                self._loop.add_writer(self._fd, self._flush)
        self._unsent += payload

    @property
    def unsent(self) -> int:
        """Bytes `send()` accepted that the guest has not taken yet."""
        return len(self._unsent)

    def close(self) -> None:
        """Stop reading; a waiting `expect` fails at once. Idempotent."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._hangup("closed by vmpilot")
        sock.close()
        self._close_transcript()

    # -- primitives the plans call ------------------------------------------

    async def _perform(self, plan: Plan[T]) -> T:
        return await arun(plan, self)

    async def _wait_data(self, seen: int, deadline: Deadline) -> None:
        while self._buf.total == seen and self.closed_reason is None:
            remaining = deadline.remaining()
            if remaining == 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _send(self, data: bytes) -> None:
        self.send(data)

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

    def _flush(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            sent = sock.send(self._unsent)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._send_error = str(exc)
            sent = len(self._unsent)  # nobody will take it now
        del self._unsent[:sent]
        if not self._unsent:
            self._loop.remove_writer(self._fd)

    def _hangup(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._unsent.clear()
        self._changed.set()
