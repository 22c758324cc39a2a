"""Deadlines hold under continuous input (issue 10, defect 4): a peer process
floods events and `wait_event` for one that never comes must time out on time.
(A process, not a thread: a thread would share our GIL and slow the flood.)"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import run_async

from vmpilot.errors import Timeout
from vmpilot.qmp import AsyncQMPClient, QMPClient

PEER = os.path.join(os.path.dirname(__file__), "qmp_flood_peer.py")
DEADLINE = 2.0
SLACK = 1.5  # generous for a shared machine; the defect overshot by 8-18 s


@pytest.fixture
def flooding_peer() -> Iterator[socket.socket]:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, PEER, str(theirs.fileno()), "30"], pass_fds=[theirs.fileno()]
    )
    theirs.close()
    try:
        yield ours
    finally:
        ours.close()  # the peer sees EPIPE and exits
        try:
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0


def test_sync_wait_event_times_out_on_time_under_a_flood(flooding_peer: socket.socket) -> None:
    with QMPClient.connect(flooding_peer) as qmp:
        qmp.wait_event("FLOOD", timeout=10)  # the flood is on
        t0 = time.monotonic()
        with pytest.raises(Timeout, match="NEVER"):
            qmp.wait_event("NEVER", timeout=DEADLINE)
        elapsed = time.monotonic() - t0
        assert DEADLINE <= elapsed < DEADLINE + SLACK
        assert qmp.dropped_events > 0  # it was really flooded
        assert not qmp.closed


def test_async_wait_event_times_out_on_time_under_a_flood(flooding_peer: socket.socket) -> None:
    async def main() -> None:
        async with AsyncQMPClient.connect(flooding_peer) as qmp:
            await qmp.wait_event("FLOOD", timeout=10)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(Timeout, match="NEVER"):
                await qmp.wait_event("NEVER", timeout=DEADLINE)
            elapsed = loop.time() - t0
            assert DEADLINE - 0.01 <= elapsed < DEADLINE + SLACK
            assert qmp.dropped_events > 0
            assert not qmp.closed

    run_async(main())
