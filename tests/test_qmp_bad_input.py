"""Input the protocol core rejects, seen from the clients (issue 10, defect 3):
the reply that came in the same chunk is still delivered, and a command left
waiting fails with `ProtocolError` at once (not by timing out, and without the
asyncio loop reporting "Exception in callback": run_async checks that)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from conftest import run_async
from test_qmp_fake_peer import Peer, Script, peer  # noqa: F401  (peer: the fixture)

from vmpilot.errors import Disconnected, ProtocolError
from vmpilot.qmp import AsyncQMPClient, QMPClient

HUGE = b"1" + b"0" * 400  # an integer no float (or 64-bit QEMU) can hold


def bad_event(id_: int) -> bytes:
    return (
        b'{"return": {"status": "running"}, "id": %d}\r\n' % id_
        + b'{"event": "STOP", "data": {}, "timestamp": {"seconds": '
        + HUGE
        + b', "microseconds": 0}}\r\n'
    )


def reply_then_bad_event(p: Peer) -> None:
    """Answer the first command and, in the same chunk, send a broken event."""
    p.greet_and_negotiate()
    cmd = p.read_command()
    p.sock.sendall(bad_event(cmd["id"]))
    p.wait_closed()


def two_commands_one_answer(p: Peer) -> None:
    p.greet_and_negotiate()
    first = p.read_command()
    p.read_command()
    p.sock.sendall(bad_event(first["id"]))
    p.wait_closed()


def test_sync_reply_in_the_same_chunk_is_delivered(peer: Callable[[Script], Peer]) -> None:  # noqa: F811
    qmp = QMPClient.connect(peer(reply_then_bad_event).client_sock)
    assert qmp.execute("query-status", timeout=10) == {"status": "running"}
    with pytest.raises(Disconnected, match="protocol error.*timestamp"):
        qmp.execute("query-status", timeout=10)
    qmp.close()


def test_async_command_left_waiting_fails_at_once(peer: Callable[[Script], Peer]) -> None:  # noqa: F811
    async def main() -> None:
        qmp = await AsyncQMPClient.connect(peer(two_commands_one_answer).client_sock)
        t0 = time.monotonic()
        first, second = await asyncio.gather(
            qmp.execute("query-status", timeout=10),
            qmp.execute("query-name", timeout=10),
            return_exceptions=True,
        )
        assert first == {"status": "running"}  # the reply before the bad line
        assert isinstance(second, ProtocolError) and "timestamp" in str(second)
        assert time.monotonic() - t0 < 5  # not the 10 s timeout
        qmp.close()

    run_async(main())
