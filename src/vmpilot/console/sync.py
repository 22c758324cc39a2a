"""The console for blocking code: a reader thread drains the socket, the
plans run in the caller's thread under one lock."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import TypeVar

from .._util.deadline import Deadline, Within
from .._util.plan import Plan, run
from ..errors import ConsoleClosed
from . import plans
from ._base import ConsoleBase, _encode
from .core import DEFAULT_TIMEOUT, QUIET, Match, PatternArg, Patterns

T = TypeVar("T")


class Console(ConsoleBase):
    """The serial console of a running VM, for blocking code (thread-safe)."""

    def __init__(self, sock: socket.socket, transcript: str | None = None, name: str = "console"):
        super().__init__(sock, transcript, name)
        sock.setblocking(True)
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"vmpilot-{name}", daemon=True)
        self._reader.start()

    # -- operations (written once, in `plans`) ------------------------------

    def expect(
        self,
        patterns: Patterns,
        *,
        fail: Patterns | None = None,
        timeout: Within = DEFAULT_TIMEOUT,
    ) -> Match:
        """Wait for the first of `patterns` (literal str/bytes, or compiled
        regex) and consume the output up to its end. A `fail` pattern (or one
        of `fail_patterns`) seen first raises `GuestError` at once, and the
        console closing (the VM died) raises `ConsoleClosed`."""
        return self._perform(plans.expect(self, patterns, fail, Deadline.of(timeout)))

    def read_until(self, pattern: PatternArg, *, timeout: Within = DEFAULT_TIMEOUT) -> str:
        """The text up to and including `pattern` (consumed)."""
        return self._perform(plans.read_until(self, pattern, Deadline.of(timeout)))

    def settle(self, quiet: float = QUIET, *, timeout: Within = DEFAULT_TIMEOUT) -> str:
        """Wait until nothing arrives for `quiet` seconds; return (and consume)
        everything pending. Raises `ExpectTimeout` if it never goes quiet."""
        return self._perform(plans.settle(self, quiet, Deadline.of(timeout)))

    def send(self, data: str | bytes) -> None:
        """Type `data` into the console (blocks until the socket took it)."""
        sock = self._open_socket()
        try:
            sock.sendall(_encode(data))
        except OSError as exc:
            raise ConsoleClosed(f"cannot send to {self.name}: {exc}") from exc

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

    # -- primitives the plans call ------------------------------------------

    def _feeding(self) -> contextlib.AbstractContextManager[object]:
        return self._cond  # the reader feeds the buffer under this lock

    def _perform(self, plan: Plan[T]) -> T:
        with self._cond:  # the reader feeds the buffer under this lock
            return run(plan, self)

    def _wait_data(self, seen: int, deadline: Deadline) -> None:
        while self._buf.total == seen and self.closed_reason is None:
            remaining = deadline.remaining()
            if remaining == 0:
                return
            self._cond.wait(remaining)

    def _send(self, data: bytes) -> None:
        # not under the lock: a guest that stops reading until its output is
        # drained must not block the reader thread
        self._cond.release()
        try:
            self.send(data)
        finally:
            self._cond.acquire()

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
