"""Spawning QEMU so that it can never outlive us, and decoding how it ended.

The child gets its own session (so a terminal's ^C does not hit it, and its
helpers die with it) and PR_SET_PDEATHSIG=SIGKILL, so it dies if the
controller dies, even by SIGKILL. Linux delivers that signal when the *thread*
that forked exits, so forks from other threads go through one long-lived
spawner thread.

The death signal is set by exec'ing util-linux's `setpriv --pdeathsig KILL`
in front of QEMU when it is there: Python then forks with vfork and returns
in ~0.2 ms. Without setpriv, a `preexec_fn` calls prctl(2) in the child,
which forces a full fork and costs ~2 ms per launch.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import functools
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Sequence

_PR_SET_PDEATHSIG = 1
_libc: ctypes.CDLL | None = None
_spawner: concurrent.futures.ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _prctl() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _child_setup(parent: int) -> None:  # runs in the child between fork and exec
    _prctl().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(125)


@functools.lru_cache(maxsize=1)
def _setpriv() -> str | None:
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if "--pdeathsig" in out else None


def _popen(
    argv: Sequence[str], pass_fds: Sequence[int], log_fd: int, inherit: bool
) -> subprocess.Popen[bytes]:
    parent = os.getpid()
    setpriv = _setpriv()
    return subprocess.Popen(
        [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log_fd,
        stderr=log_fd,
        pass_fds=() if inherit else tuple(pass_fds),  # inherit: the fds are inheritable already
        start_new_session=True,
        preexec_fn=None if setpriv else lambda: _child_setup(parent),
        close_fds=not inherit,
    )


def spawn(
    argv: Sequence[str], pass_fds: Sequence[int], log_fd: int, *, inherit: bool = False
) -> subprocess.Popen[bytes]:
    """Start QEMU with stdout+stderr to `log_fd`, sharing only `pass_fds` —
    or, with `inherit=True`, every inheritable fd (`pass_fds` must be made
    inheritable by the caller), as old harnesses expect."""
    if _setpriv() is None:
        _prctl()  # load libc before fork, not in the child
    if threading.current_thread() is threading.main_thread():
        return _popen(argv, pass_fds, log_fd, inherit)
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = concurrent.futures.ThreadPoolExecutor(1, "vmpilot-spawner")
    return _spawner.submit(_popen, argv, pass_fds, log_fd, inherit).result()


def describe_status(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit status {returncode}"
