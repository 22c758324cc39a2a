"""Observe, through /proc, that a thread is blocked in the kernel: how a test
knows a call is really waiting without peeking at the client's private locks."""

from __future__ import annotations

import threading

# x86_64 numbers: poll, ppoll, select, pselect6, epoll_wait, epoll_pwait
_WAITING = {7, 271, 23, 270, 232, 281}


def blocked_in_poll(thread: threading.Thread) -> bool:
    """Whether `thread` is inside a poll-like system call right now."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/syscall") as f:
            first = f.read().split(maxsplit=1)[0]
    except (OSError, IndexError):
        return False  # not started yet, or already gone
    return first.isdigit() and int(first) in _WAITING
