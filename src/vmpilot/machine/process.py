"""The one owner of a QEMU process (`QemuProcess`), for `Machine`,
`AsyncMachine` and the compat shim alike: spawning it so that it can never
outlive its controller, its pidfd, killing it (its process group), recording
how it ended, and telling a crash (a signal vmpilot did not send) from an
ordinary end.

The child gets its own session (so a terminal's ^C does not hit it, and its
helpers die with it) and PR_SET_PDEATHSIG=SIGKILL, so it dies if the
controller dies, even by SIGKILL. Linux delivers that signal when the *thread*
that forked exits, so forks from threads other than the main one go through
one spawner thread that lives as long as the process.

The death signal is set by exec'ing util-linux's `setpriv --pdeathsig KILL`
in front of QEMU when it is there (Python then forks with vfork and returns
in ~0.2 ms), then `/bin/sh` checks that its parent is still the controller
before exec'ing QEMU: `setpriv` sets the signal only after it has been
exec'd, and a controller that died before that moment would otherwise leave
QEMU running (measured: 14 of 40 kills right after Popen returned). A parent
gone before prctl → sh's `$PPID` (read after it) is not the controller →
exit 125; gone after → SIGKILL. Without setpriv, a `preexec_fn` makes the same
check in the child after prctl(2), at the price of a full fork (~2 ms).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import queue
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("vmpilot.machine")

_PR_SET_PDEATHSIG = 1
PARENT_GONE = 125  # the exit status of a child whose controller died during the spawn
# run by /bin/sh after setpriv set the death signal: $PPID is read after it
_PARENT_CHECK = '[ "$PPID" = "$1" ] || exit 125; shift; exec "$@"'
_libc: ctypes.CDLL | None = None


def _prctl() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _child_setup(parent: int) -> None:  # runs in the child between fork and exec
    _prctl().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(PARENT_GONE)


@functools.lru_cache(maxsize=1)
def _setpriv() -> tuple[str, str] | None:
    """(setpriv, sh) when both are usable, else None (then: preexec_fn)."""
    path, sh = shutil.which("setpriv"), shutil.which("sh")
    if path is None or sh is None:
        return None
    try:
        out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (path, sh) if "--pdeathsig" in out else None


def command(argv: Sequence[str], parent: int) -> list[str]:
    """The argv that runs `argv` with the death signal set and checked."""
    tools = _setpriv()
    if tools is None:
        return list(argv)
    setpriv, sh = tools
    return [setpriv, "--pdeathsig", "KILL", "--", sh, "-c", _PARENT_CHECK, "vmpilot-spawn",
            str(parent), *argv]  # fmt: skip


def _popen(
    argv: Sequence[str], pass_fds: Sequence[int], log_fd: int, inherit: bool
) -> subprocess.Popen[bytes]:
    parent = os.getpid()
    setpriv = _setpriv() is not None
    return subprocess.Popen(
        command(argv, parent),
        stdin=subprocess.DEVNULL,
        stdout=log_fd,
        stderr=log_fd,
        pass_fds=() if inherit else tuple(pass_fds),  # inherit: the fds are inheritable already
        start_new_session=True,
        preexec_fn=None if setpriv else lambda: _child_setup(parent),
        close_fds=not inherit,
    )


class _Spawner:
    """A daemon thread that forks for every other thread: it lives as long as
    the process (daemon threads are never joined, so it does not end at
    interpreter shutdown before atexit handlers stop their VMs)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]
        self._jobs = queue.SimpleQueue()
        threading.Thread(target=self._run, name="vmpilot-spawner", daemon=True).start()

    def _run(self) -> None:
        while True:
            job, future = self._jobs.get()
            try:
                future.set_result(job())
            except BaseException as exc:
                future.set_exception(exc)

    def call(self, job: Callable[[], Any]) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((job, future))
        return future.result()


_spawner: _Spawner | None = None
_spawner_lock = threading.Lock()


def _forget_spawner() -> None:  # a forked child has no spawner thread
    global _spawner, _spawner_lock
    _spawner, _spawner_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_spawner)


def spawn(
    argv: Sequence[str], pass_fds: Sequence[int], log_fd: int, *, inherit: bool = False
) -> subprocess.Popen[bytes]:
    """Start QEMU with stdout+stderr to `log_fd`, sharing only `pass_fds` —
    or, with `inherit=True`, every inheritable fd (`pass_fds` must be made
    inheritable by the caller), as old harnesses expect."""
    if _setpriv() is None:
        _prctl()  # load libc before fork, not in the child

    def job() -> subprocess.Popen[bytes]:
        return _popen(argv, pass_fds, log_fd, inherit)

    if threading.current_thread() is threading.main_thread():
        return job()
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = _Spawner()
    return _spawner.call(job)  # type: ignore[no-any-return]


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the calling process get `sig` when its parent process goes
    (PR_SET_PDEATHSIG), for helpers such as test workers that must not
    outlive what started them. A parent already gone by the time the signal
    is set gets the same result: `sig` at once."""
    parent = os.getppid()
    _prctl().prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:  # reparented before prctl took effect
        os.kill(os.getpid(), sig)


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


class QemuProcess:
    """One QEMU process and everything about it as a process: spawned (see
    the module doc), a pidfd (readable once it exits), kill (its whole
    process group), reaping, the exit record, and crash detection: an end by
    a signal vmpilot did not send is a crash, logged once with `crash_note()`
    appended. Thread-safe."""

    def __init__(
        self,
        argv: Sequence[str],
        pass_fds: Sequence[int],
        log_fd: int,
        *,
        inherit: bool = False,
        crash_note: Callable[[], str] = str,
    ) -> None:
        self.argv = list(argv)
        self.crash_note = crash_note
        self.returncode: int | None = None
        self.crashed = False
        self._sent: set[int] = set()
        self._lock = threading.Lock()
        self.proc = spawn(argv, pass_fds, log_fd, inherit=inherit)
        try:
            # still our unreaped child, so the pid cannot have been reused
            self.pidfd = os.pidfd_open(self.proc.pid)
        except OSError:
            self.kill()
            self.proc.wait()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to QEMU's process group (QEMU leads it); nothing once reaped."""
        with self._lock:
            if self.returncode is not None or self.proc.returncode is not None:
                return
            self._sent.add(sig)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def poll(self) -> int | None:
        """The exit status if QEMU has ended (recorded), else None; never blocks."""
        if self.returncode is None:
            rc = self.proc.poll()
            if rc is not None:
                self.record_exit(rc)
        return self.returncode

    def wait(self, timeout: float | None) -> int:
        """Wait (bounded) for the exit and record it; `subprocess.TimeoutExpired`
        when QEMU is still there."""
        if self.returncode is None:
            self.record_exit(self.proc.wait(timeout))
        assert self.returncode is not None
        return self.returncode

    def reap(self, timeout: float | None) -> bool:
        """Wait (bounded) for QEMU to exit and record how; True if it has."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def record_exit(self, rc: int) -> None:
        """Record how QEMU ended (the first record counts) and log a crash."""
        with self._lock:
            if self.returncode is not None:
                return
            self.returncode = rc
            self.crashed = rc < 0 and -rc not in self._sent
        if self.crashed:
            log.warning(
                "QEMU pid %d %s (a signal vmpilot did not send)%s",
                self.proc.pid, describe_status(rc), self.crash_note(),
            )  # fmt: skip

    def close(self, timeout: float = 10) -> None:
        """Kill QEMU if it still runs, reap it, close the pidfd. Idempotent."""
        if self.returncode is None:
            self.kill()
            self.reap(timeout)
        with self._lock:
            fd, self.pidfd = self.pidfd, -1
        if fd >= 0:
            os.close(fd)

    @property
    def exit_code(self) -> int | None:
        rc = self.returncode
        return rc if rc is not None and rc >= 0 else None

    @property
    def exit_signal(self) -> int | None:
        rc = self.returncode
        return -rc if rc is not None and rc < 0 else None
