"""Observe, through /proc, that a thread is blocked in the kernel waiting for
input: how a test knows a call is really waiting without peeking at the
client's private locks."""

from __future__ import annotations

import threading

# x86_64 numbers: read, poll, select, recvfrom, recvmsg, epoll_wait, pselect6, ppoll, epoll_pwait
_WAITING = {0, 7, 23, 45, 47, 232, 270, 271, 281}


def blocked_reading(thread: threading.Thread) -> bool:
    """Whether `thread` is inside a read- or poll-like system call right now."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/syscall") as f:
            first = f.read().split(maxsplit=1)[0]
    except (OSError, IndexError):
        return False  # not started yet, or already gone
    return first.isdigit() and int(first) in _WAITING
