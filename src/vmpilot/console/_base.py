"""What both console faces hold: the buffer, the transcript, listeners and
the closed state (written by the face's reader, read by the plans)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable

from ..errors import ConsoleClosed
from .core import PANIC, ConsoleBuffer, PatternArg

log = logging.getLogger("vmpilot.console")


class ConsoleBase:
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
        # seen first by any expect(), these fail it at once; a kernel panic by
        # default (`GuestPanicked`): waiting on a panicked guest only times out
        self.fail_patterns: list[PatternArg] = [PANIC]
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

    def follow(self, listener: Callable[[bytes], object]) -> None:
        """Call `listener` with what the console holds now (not yet consumed
        by `expect`), then with every chunk as it arrives — atomically with
        the reader, so no chunk is missed or seen twice. For mirroring a
        guest's output from a known point (e.g. `vmpilot run -- CMD`)."""
        with self._feeding():
            listener(bytes(self._buf.data))
            self.listeners.append(listener)

    def _feeding(self) -> contextlib.AbstractContextManager[object]:
        """Held while the reader feeds the buffer (a face with a reader thread locks)."""
        return contextlib.nullcontext()

    def send_line(self, line: str | bytes) -> None:
        """Type `line` and Enter."""
        self.send(_encode(line) + b"\n")

    def send(self, data: str | bytes) -> None:
        raise NotImplementedError

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

    def _open_socket(self) -> socket.socket:
        """The socket to send on, or `ConsoleClosed`."""
        sock = self._sock
        if sock is None or self.closed_reason is not None:
            raise ConsoleClosed(
                f"cannot send to {self.name}: console closed ({self.closed_reason})"
            )
        return sock

    def _failure(self, what: str, patterns: str, timeout: float | None) -> str:
        where = f"\ntranscript: {self.transcript_path}" if self.transcript_path else ""
        limit = f" within {timeout:g} s" if timeout is not None else ""
        return (
            f"{what}{limit} while expecting {patterns} on {self.name}; "
            f"last console output:\n{self.tail()}{where}"
        )


def _encode(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else data
