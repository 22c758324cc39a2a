"""`AsyncConsole.send` keeps what the socket does not take at once (bounded)
and sends it, in order, as the guest reads, as `AsyncQMPClient` does."""

from __future__ import annotations

import asyncio
import socket

import pytest
from conftest import QEMU, run_async

from vmpilot import AsyncMachine, ConsoleClosed, GuestError, guest
from vmpilot.console import MAX_UNSENT, AsyncConsole

BIG = 900 * 1024  # more than a socket buffer holds, less than MAX_UNSENT


async def _read_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
        assert chunk, "the console side closed early"
        got += chunk
    return bytes(got)


def test_send_past_the_socket_buffer_is_kept_and_flushed_in_order() -> None:
    async def main() -> None:
        ours, guest_side = socket.socketpair()
        guest_side.setblocking(False)
        con = AsyncConsole(ours, None, "test console")
        try:
            first = bytes(range(256)) * (BIG // 256)
            con.send(first)  # the guest is not reading yet: most of it waits
            assert con.unsent > 0
            con.send_line("and then this")
            expected = first + b"and then this\n"
            assert await _read_exactly(guest_side, len(expected)) == expected
            assert con.unsent == 0
        finally:
            con.close()
            guest_side.close()

    run_async(main())


def test_send_past_the_bound_fails_clearly_and_sends_nothing() -> None:
    async def main() -> None:
        ours, guest_side = socket.socketpair()
        guest_side.setblocking(False)
        con = AsyncConsole(ours, None, "test console")
        try:
            con.send(b"a" * BIG)
            kept = con.unsent
            with pytest.raises(GuestError, match=r"still unsent.*bound") as info:
                con.send(b"b" * (MAX_UNSENT - kept + 1))
            assert not isinstance(info.value, ConsoleClosed) and con.unsent == kept
            assert await _read_exactly(guest_side, BIG) == b"a" * BIG
            con.close()
            with pytest.raises(ConsoleClosed):
                con.send(b"late")
        finally:
            con.close()
            guest_side.close()

    run_async(main())


def test_send_to_a_paused_guest_does_not_raise(tmp_path: object) -> None:
    """A stopped VM reads no console input (its UART FIFO is full)."""
    bios = guest.tiny.write(str(tmp_path))

    async def main() -> None:
        async with AsyncMachine(guest.tiny.config(bios, qemu=QEMU)) as vm:
            await vm.console.expect(guest.tiny.READY, timeout=10)
            await vm.execute("stop")
            vm.console.send(b"a" * BIG)
            assert vm.console.unsent > 0

    run_async(main())
