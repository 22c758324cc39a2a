"""No channel call outlasts its deadline, even while input keeps coming: a
peer *process* floods the agent and qtest sockets with lines that are never
the awaited answer."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from vmpilot import AgentTimeout, Timeout
from vmpilot.qga import GuestAgent
from vmpilot.qtest import Qtest

FLOOD_SECONDS = 10.0  # how long the peer floods; the calls' deadlines are 1 s

_PEER = """
import socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
line, end = sys.argv[2].encode() + b"\\n", time.monotonic() + float(sys.argv[3])
block = line * (65536 // len(line))
try:
    sock.sendall(bytes.fromhex(sys.argv[4]))
    while time.monotonic() < end:
        sock.sendall(block)
except OSError:
    pass
"""


@pytest.fixture
def flooded() -> Iterator[Callable[..., socket.socket]]:
    """`flooded(line, first)` → our end of a socket a peer process sends
    `first` and then floods with `line`."""
    procs: list[subprocess.Popen[bytes]] = []
    socks: list[socket.socket] = []

    def start(line: str, first: bytes = b"") -> socket.socket:
        ours, theirs = socket.socketpair()
        socks.append(ours)
        cmd = [
            sys.executable,
            "-c",
            _PEER,
            str(theirs.fileno()),
            line,
            str(FLOOD_SECONDS),
            first.hex(),
        ]
        procs.append(subprocess.Popen(cmd, pass_fds=[theirs.fileno()]))
        theirs.close()
        ours.recv(1, socket.MSG_PEEK)  # the flood has begun
        return ours

    yield start
    for s in socks:
        s.close()  # the peer's next write fails: it exits
    for p in procs:
        p.kill()
        p.wait(10)


def test_agent_sync_ends_at_its_deadline_under_a_flood(
    flooded: Callable[..., socket.socket],
) -> None:
    # past the 0xFF, each line is parsed: stale answers, never our token
    agent = GuestAgent(flooded('{"return": 1}', b"\xff"))
    t0 = time.monotonic()
    with pytest.raises(AgentTimeout):
        agent.sync(timeout=1)
    elapsed = time.monotonic() - t0
    agent.close()
    assert elapsed < 3, f"sync(timeout=1) took {elapsed:.1f} s"


def test_qtest_request_ends_at_its_deadline_under_a_flood(
    flooded: Callable[..., socket.socket],
) -> None:
    qt = Qtest(flooded("IRQ raise 1"))
    t0 = time.monotonic()
    with pytest.raises(Timeout):
        qt.command("clock_step", timeout=1)
    elapsed = time.monotonic() - t0
    assert qt.irq_level(1)
    qt.close()
    assert elapsed < 3, f"command(timeout=1) took {elapsed:.1f} s"
