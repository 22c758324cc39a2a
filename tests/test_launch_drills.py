"""Drills for defect 1 of issue 10: a controller SIGKILLed while it launches
QEMU must never leave QEMU running (0 orphans, at any moment).

Each drill runs a controller *process* (Machine, AsyncMachine or the compat
QEMUMachine on `-machine none`) and kills it (a) right after
`subprocess.Popen` returns, or (b) at a random moment 0-30 ms into
`launch()`. Every process the controller starts inherits a token in its
environment, so the drill finds exactly its own processes (also those whose
pid the controller never got to report) and nobody else's; each is pinned
with a pidfd (no pid-reuse confusion) and must be gone within a deadline.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import QEMU

DRILL_VAR = "VMPILOT_DRILL"
GONE_WITHIN = 5.0  # s: a QEMU killed by its death signal is gone in milliseconds
CONTROLLER_DEADLINE = 30.0  # s: a controller that never reaches launch() is a bug

# Run as `python -c CONTROLLER flavour mode qemu report_fd tmpdir`. It reports
# "go" just before launch(), "pid N" when Popen returns for QEMU (mode
# "popen": then it SIGKILLs itself), "up" once launched; then it waits to be killed.
CONTROLLER = r"""
import asyncio, os, signal, subprocess, sys
flavour, mode, qemu, report, tmp = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
from vmpilot import AsyncMachine, Machine
from vmpilot.compat.machine import QEMUMachine

class Reporting(subprocess.Popen):
    def __init__(self, args, *a, **kw):
        super().__init__(args, *a, **kw)
        if qemu in list(args):  # QEMU, not a probe like `setpriv --help`
            os.write(report, b"pid %d\n" % self.pid)
            if mode == "popen":
                os.kill(os.getpid(), signal.SIGKILL)

subprocess.Popen = Reporting
os.write(report, b"go\n")
if flavour == "Machine":
    Machine(machine="none", accel="tcg", memory=32, qemu=qemu).launch()
elif flavour == "AsyncMachine":
    async def main():
        await AsyncMachine(machine="none", accel="tcg", memory=32, qemu=qemu).launch()
    asyncio.run(main())
else:
    QEMUMachine(qemu, ["-machine", "none", "-nodefaults"], base_temp_dir=tmp).launch()
os.write(report, b"up\n")
signal.pause()
"""

FLAVOURS = ["Machine", "AsyncMachine", "compat"]


def _has_token(pid: int, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in f.read().split(b"\0")
    except OSError:  # gone (a zombie's environ reads empty)
        return False


def _pin(pids: set[int], needle: bytes) -> dict[int, int]:
    """pidfds of those `pids` that are still the processes carrying `needle`:
    the pidfd is opened first, then the token checked, so a reused pid is
    never mistaken for ours."""
    pinned = {}
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        if _has_token(pid, needle):
            pinned[pid] = fd
        else:
            os.close(fd)
    return pinned


def _carrying(needle: bytes) -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _has_token(int(entry), needle):
            pids.add(int(entry))
    return pids


def _survivors(pinned: dict[int, int], timeout: float) -> list[int]:
    """Wait (bounded) for every pinned process to exit; those still there."""
    poller = select.poll()
    for fd in pinned.values():
        poller.register(fd, select.POLLIN)
    left = set(pinned.values())
    end = _now() + timeout
    while left and (remaining := end - _now()) > 0:
        for fd, _ in poller.poll(remaining * 1000):
            poller.unregister(fd)
            left.discard(fd)
    return [pid for pid, fd in pinned.items() if fd in left]


def _now() -> float:
    import time

    return time.monotonic()


def _read_lines(fd: int, until: str | None, timeout: float) -> list[str]:
    """Lines from the report pipe until `until` arrives; with None, what is
    there now (not EOF: a compat QEMU inherits the pipe, as in-tree's does)."""
    buf = b""
    end = _now() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        lines = buf.decode().splitlines()
        if until is not None and until in lines:
            return lines
        remaining = end - _now() if until is not None else 0
        if remaining < 0:
            raise AssertionError(f"controller report timed out; got {lines}")
        if not poller.poll(remaining * 1000):
            if until is None:
                return lines
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            if until is not None:
                raise AssertionError(f"controller ended its report early; got {lines}")
            return lines
        buf += chunk


def drill(flavour: str, mode: str, tmp: Path, delay: float = 0.0) -> tuple[list[int], list[str]]:
    """Run one controller and kill it as `mode` says; returns the orphans
    (pids, already killed by us) and what the controller reported."""
    token = uuid.uuid4().hex
    needle = f"{DRILL_VAR}={token}".encode()
    tmp.mkdir(exist_ok=True)
    r, w = os.pipe()
    env = {**os.environ, DRILL_VAR: token, "TMPDIR": str(tmp)}
    ctl = subprocess.Popen(
        [sys.executable, "-c", CONTROLLER, flavour, mode, QEMU, str(w), str(tmp)],
        pass_fds=(w,), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(w)
    pinned: dict[int, int] = {}
    try:
        lines = _read_lines(r, "go", CONTROLLER_DEADLINE)
        ctl_fd = os.pidfd_open(ctl.pid)
        try:
            if mode == "random":
                # the controller runs for `delay` (unless it dies first), then is killed
                select.select([ctl_fd], [], [], delay)
                signal.pidfd_send_signal(ctl_fd, signal.SIGKILL)
            elif not select.select([ctl_fd], [], [], CONTROLLER_DEADLINE)[0]:
                signal.pidfd_send_signal(ctl_fd, signal.SIGKILL)
                raise AssertionError("the controller did not kill itself after Popen")
        finally:
            os.close(ctl_fd)
        rc = ctl.wait(CONTROLLER_DEADLINE)
        lines += _read_lines(r, None, CONTROLLER_DEADLINE)
        assert rc == -signal.SIGKILL, (rc, lines)
        reported = {int(line.split()[1]) for line in lines if line.startswith("pid ")}
        if mode == "popen":
            assert reported, f"the controller died before QEMU's Popen returned: {lines}"
        pinned = _pin(reported | _carrying(needle), needle)
        orphans = _survivors(pinned, GONE_WITHIN)
        for pid in orphans:  # ours (they carry our token): they must not outlive the test
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pinned[pid], signal.SIGKILL)
        _survivors({pid: pinned[pid] for pid in orphans}, GONE_WITHIN)
        return orphans, lines
    finally:
        os.close(r)
        for fd in pinned.values():
            os.close(fd)
        if ctl.poll() is None:
            ctl.kill()
            ctl.wait(CONTROLLER_DEADLINE)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_killed_right_after_popen_returns_leaves_no_qemu(flavour: str, tmp_path: Path) -> None:
    runs = 12
    orphans = [drill(flavour, "popen", tmp_path / str(i))[0] for i in range(runs)]
    assert not any(orphans), f"{sum(map(bool, orphans))}/{runs} drills left QEMU: {orphans}"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_killed_at_random_moments_into_launch_leaves_no_qemu(flavour: str, tmp_path: Path) -> None:
    runs = 24
    rng = random.Random(f"{flavour}-{os.getpid()}")
    orphans = []
    for i in range(runs):
        found, _ = drill(flavour, "random", tmp_path / str(i), delay=rng.uniform(0, 0.030))
        orphans.append(found)
    assert not any(orphans), f"{sum(map(bool, orphans))}/{runs} drills left QEMU: {orphans}"
