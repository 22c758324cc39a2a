"""A deadline computed once and consulted by every wait of one call."""

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

    def remaining(self) -> float | None:
        """Seconds left (never negative), or None for no deadline."""
        if self.at is None:
            return None
        return max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at
