"""QMPClient shared by threads, against real QEMU -machine none (issue 10, defect 2).

A command issued while another thread waits for an event completes in about
one round trip; no wait outlasts its deadline; a deadline that passes before
a command was sent leaves the connection open.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import RawQemu
from test_qmp_fake_peer import Peer, Script, peer  # noqa: F401  (peer: the fixture)

from vmpilot.errors import CommandError, Disconnected, Timeout
from vmpilot.qmp import QMPClient

SLACK = 1.0  # generous: the machine is shared; a round trip is well under 1 ms


def _park_a_waiter(qmp: QMPClient, timeout: float) -> tuple[threading.Thread, list[BaseException]]:
    """Start a thread in `wait_event("NEVER")` and return once it is provably
    the one reading the socket: listeners run in the thread that read the
    event, so an event delivered in that thread proves it is inside."""
    outcome: list[BaseException] = []
    reading = threading.Event()

    def waiter() -> None:
        try:
            qmp.wait_event("NEVER", timeout=timeout)
        except (Timeout, Disconnected) as exc:
            outcome.append(exc)

    t = threading.Thread(target=waiter)
    handle = qmp.add_listener(lambda ev: reading.set() if threading.current_thread() is t else None)
    t.start()
    for _ in range(50):  # until the waiter is the reader (each try is bounded)
        qmp.execute("stop", timeout=10)
        qmp.execute("cont", timeout=10)
        if reading.wait(0.1):
            break
    assert reading.is_set(), "the waiter never read an event"
    qmp.remove_listener(handle)
    return t, outcome


def test_commands_complete_while_another_thread_waits_for_an_event(raw_qemu: RawQemu) -> None:
    with QMPClient.connect(raw_qemu.take_socket()) as qmp:
        t0 = time.monotonic()
        waiter, outcome = _park_a_waiter(qmp, timeout=4)
        for _ in range(20):
            started = time.monotonic()
            assert qmp.execute("query-status", timeout=10)["status"] == "running"
            assert time.monotonic() - started < SLACK
            assert not qmp.closed
        waiter.join(10)
        assert not waiter.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], Timeout)
        assert time.monotonic() - t0 < 4 + SLACK  # the waiter kept its own deadline too
        assert not qmp.closed
        assert qmp.execute("query-name") == {}


def test_a_follower_never_outlasts_its_deadline(raw_qemu: RawQemu) -> None:
    """The reader waits 30 s; a command whose reply will not come (QEMU
    stopped) times out after its own 0.3 s, not the reader's."""
    qmp = QMPClient.connect(raw_qemu.take_socket())
    try:
        waiter, outcome = _park_a_waiter(qmp, timeout=30)
        os.kill(raw_qemu.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(Timeout, match="reply to 'query-status'"):
                qmp.execute("query-status", timeout=0.3)
            assert time.monotonic() - started < 0.3 + SLACK
        finally:
            os.kill(raw_qemu.proc.pid, signal.SIGCONT)
        # that command was sent and its reply lost: the stream is no longer
        # trusted, so it is closed, which also ends the waiter at once
        assert qmp.closed
        waiter.join(5)
        assert not waiter.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], Disconnected)
    finally:
        qmp.close()


class PartialSendSocket(socket.socket):
    """Tells when a send could not go out whole (the peer's buffer is full)."""

    blocked = threading.Event()

    def send(self, data: Any, flags: int = 0) -> int:
        n = super().send(data, flags)
        if n < len(data):
            self.blocked.set()
        return n

    def sendall(self, data: Any, flags: int = 0) -> None:  # what the old client used
        self.blocked.set()
        super().sendall(data, flags)


@pytest.fixture
def watchdog(raw_qemu: RawQemu) -> Iterator[None]:
    """Whatever the test does, QEMU is resumed after 15 s (bounded hang)."""
    timer = threading.Timer(15, lambda: os.kill(raw_qemu.proc.pid, signal.SIGCONT))
    timer.start()
    yield
    timer.cancel()


def test_a_command_that_could_not_be_sent_in_time_leaves_the_connection_open(
    raw_qemu: RawQemu, watchdog: None
) -> None:
    """Thread A's huge command fills a stopped QEMU's socket buffer and holds
    the send lock; B's command times out before it was sent: `Timeout`, and
    the connection stays usable."""
    sock = PartialSendSocket(fileno=raw_qemu.take_socket().detach())
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # small: 128 KiB fills it
    qmp = QMPClient.connect(sock)
    try:
        os.kill(raw_qemu.proc.pid, signal.SIGSTOP)
        big: list[BaseException] = []

        def sender() -> None:
            try:
                qmp.execute("query-status", {"pad": "x" * (128 << 10)}, timeout=20)
            except CommandError as exc:  # QEMU refuses the unknown argument
                big.append(exc)

        a = threading.Thread(target=sender)
        a.start()
        assert sock.blocked.wait(5), "the big command never filled the buffer"
        started = time.monotonic()
        with pytest.raises(Timeout, match="sending 'query-name'"):
            qmp.execute("query-name", timeout=0.3)
        assert time.monotonic() - started < 0.3 + SLACK
        assert not qmp.closed, qmp.closed_reason
        os.kill(raw_qemu.proc.pid, signal.SIGCONT)
        a.join(30)
        assert not a.is_alive()
        assert len(big) == 1 and big[0].error_class == "GenericError"  # type: ignore[attr-defined]
        assert qmp.execute("query-name", timeout=10) == {}
    finally:
        os.kill(raw_qemu.proc.pid, signal.SIGCONT)
        qmp.close()


def test_zero_timeout_still_sees_what_has_already_arrived(
    peer: Callable[[Script], Peer],  # noqa: F811
) -> None:
    """`timeout=0` means "no waiting", not "ignore what the kernel holds"."""
    sent = threading.Event()

    def script(p: Peer) -> None:
        p.greet_and_negotiate()
        assert p.sock.recv(1) == b" "  # the client's pass_fd: it is not reading now
        p.sock.sendall(
            b'{"event": "X", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}\r\n'
        )
        sent.set()
        p.wait_closed()

    with QMPClient.connect(peer(script).client_sock) as qmp:
        qmp.pass_fd(0)  # a byte with no reply: tells the peer to send the event
        assert sent.wait(10)  # in our socket's receive buffer now, not read yet
        assert qmp.wait_event("X", timeout=0).seconds == 1
        assert not qmp.closed
