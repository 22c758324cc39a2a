"""A deadline computed once and consulted by every wait of one call.

An operation takes `timeout` from its caller once, makes it a `Deadline`,
and passes that object down to every step (and to the operations it calls),
so the whole call ends when the caller said, however many waits it makes.
"""

from __future__ import annotations

import time


class Deadline:
    """`timeout` seconds from now; `None` means never (only when asked for)."""

    __slots__ = ("at", "timeout")

    def __init__(self, timeout: float | None) -> None:
        if timeout is not None and (timeout != timeout or timeout < 0):
            raise ValueError(f"timeout must be a number >= 0 or None, not {timeout!r}")
        self.timeout = timeout
        self.at = None if timeout is None else time.monotonic() + timeout

    @classmethod
    def of(cls, timeout: Within) -> Deadline:
        """A caller's deadline as it is, or a new one from seconds."""
        return timeout if isinstance(timeout, Deadline) else cls(timeout)

    def remaining(self) -> float | None:
        """Seconds left (never negative), or None for no deadline."""
        if self.at is None:
            return None
        return max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    def within(self, seconds: float) -> Deadline:
        """A deadline `seconds` from now, or this one if it comes first (a
        step with its own limit, e.g. a quiet period, inside this call)."""
        sooner = Deadline(max(0.0, seconds))
        if self.at is not None and sooner.at is not None and self.at <= sooner.at:
            return self
        return sooner

    def __repr__(self) -> str:
        return f"Deadline(timeout={self.timeout!r}, remaining={self.remaining()!r})"


# a channel operation's `timeout`: seconds, None (no limit), or the caller's
# own Deadline, passed down as it is
Within = float | Deadline | None
