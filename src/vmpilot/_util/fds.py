"""File descriptors handed to vmpilot by its user."""

from __future__ import annotations

import os


def check_fd(fd: int) -> int:
    """`fd` if it is an open file descriptor; a clear error before it is sent
    anywhere otherwise."""
    if isinstance(fd, bool) or not isinstance(fd, int):
        raise TypeError(f"fd must be an int file descriptor, not {fd!r}")
    try:
        os.fstat(fd)
    except OSError as exc:
        raise ValueError(f"fd {fd} is not an open file descriptor: {exc.strerror}") from None
    return fd
