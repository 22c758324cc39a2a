"""The serial console, against the tiny firmware guest (boots in ~50 ms) and
as a pure buffer."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import QEMU, run_async, wait_until

from vmpilot import AbnormalShutdown, AsyncMachine, GuestError, Machine, Timeout, guest
from vmpilot._util.deadline import Deadline
from vmpilot.console import ConsoleBuffer, ExpectTimeout, visible


@pytest.fixture(scope="module")
def bios(tmp_path_factory: pytest.TempPathFactory) -> str:
    return guest.tiny.write(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture
def tiny(bios: str) -> Iterator[Machine]:
    with Machine(guest.tiny.config(bios, qemu=QEMU, accel="tcg")) as vm:
        vm.console.expect(guest.tiny.READY + "\r\n", timeout=10)
        yield vm


def test_expect_literal_regex_and_lists(tiny: Machine) -> None:
    con = tiny.console
    con.send("abc-123-xyz")
    m = con.expect(re.compile(r"(\d+)-(?P<tail>x\w\w)"), timeout=5)
    assert (m.index, m.text, m.group(1), m.group("tail")) == (0, "123-xyz", "123", "xyz")
    assert m.before == b"abc-"
    con.send("second")
    m = con.expect(["nope", "cond", "second"], timeout=5)  # both complete with the same byte
    assert m.index == 2 and m.text == "second"  # the earliest start wins
    con.send(b"caf\xc3\xa9 \xff")
    assert con.expect("café", timeout=5).text == "café"  # str patterns match their UTF-8 bytes


def test_read_until_and_settle(tiny: Machine) -> None:
    con = tiny.console
    con.send("one two three")
    assert con.read_until("two", timeout=5) == "one two"
    assert con.settle(quiet=0.2, timeout=5) == " three"


def test_timeout_message_says_everything(tiny: Machine) -> None:
    tiny.console.send("some\x01output")
    with pytest.raises(ExpectTimeout) as info:
        tiny.console.expect(["never-a", re.compile("never-b")], timeout=0.3)
    text = str(info.value)
    assert "'never-a', re.compile('never-b')" in text and "0.3 s" in text
    assert "some\\x01output" in text and "TINY-GUEST READY" in text
    assert f"transcript: {tiny.console.transcript_path}" in text
    assert isinstance(info.value, GuestError) and isinstance(info.value, Timeout)


def test_failure_pattern_aborts_at_once(tiny: Machine) -> None:
    tiny.console.send("Kernel panic - not syncing")
    t0 = time.monotonic()
    with pytest.raises(GuestError, match="failure pattern matched 'Kernel panic'"):
        tiny.console.expect("never", timeout=30, fail="Kernel panic")
    assert time.monotonic() - t0 < 5
    tiny.console.fail_patterns.append("BUG:")
    tiny.console.send("BUG: oops")
    with pytest.raises(GuestError, match="BUG:"):
        tiny.console.expect("never", timeout=30)


def test_vm_death_fails_expect_at_once(tiny: Machine) -> None:
    tiny.console.send(b"~\x01")  # isa-debug-exit: QEMU exits
    t0 = time.monotonic()
    with pytest.raises(GuestError, match="console closed") as info:
        tiny.console.expect("never", timeout=30)
    assert time.monotonic() - t0 < 5 and not isinstance(info.value, Timeout)
    assert tiny.wait(timeout=10) == 3


def test_shutdown_while_expect_waits_in_another_thread(tiny: Machine) -> None:
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            tiny.console.expect("never", timeout=30)
        except BaseException as exc:
            errors.append(exc)

    # the console's "wait for data" primitive, instrumented: tells when expect waits
    waiting = threading.Event()
    wait_data = tiny.console._wait_data

    def spy(seen: int, deadline: Deadline) -> None:
        waiting.set()
        wait_data(seen, deadline)

    tiny.console._wait_data = spy  # type: ignore[method-assign]
    t = threading.Thread(target=waiter)
    t.start()
    assert waiting.wait(10)
    t0 = time.monotonic()
    tiny.shutdown(method="powerdown", timeout=10)
    t.join(10)
    assert time.monotonic() - t0 < 5
    assert len(errors) == 1 and isinstance(errors[0], GuestError)


def test_powerdown_is_graceful(tiny: Machine) -> None:
    tiny.shutdown(method="powerdown", timeout=10)
    assert tiny.exit_code == 0 and "POWER BUTTON" in tiny.console_log


def test_wedged_guest_ignores_powerdown(tiny: Machine) -> None:
    tiny.console.send("!")  # cli; hlt forever
    # the power button must find it wedged, not still polling: wait for the halt
    wait_until(
        lambda: (
            "HLT=1" in tiny.execute("human-monitor-command", {"command-line": "info registers"})
        ),
        what="the tiny guest to halt",
    )
    pid, tmp = tiny.pid, tiny.temp_dir
    with pytest.raises(AbnormalShutdown, match="did not exit within 0.5 s"):
        tiny.shutdown(method="powerdown", timeout=0.5)
    assert tiny.state == "stopped" and tmp is not None and not Path(tmp).exists()
    assert pid is not None and not Path(f"/proc/{pid}").exists()


def test_guest_chosen_exit_code(tiny: Machine) -> None:
    tiny.console.send(b"~\x15")
    assert tiny.wait(timeout=10) == (0x15 << 1) | 1
    assert tiny.exit_code == 43 and not tiny.crashed


def test_console_needs_serial() -> None:
    with (
        Machine(machine="none", qemu=QEMU, memory=16) as vm,
        pytest.raises(Exception, match="serial=True"),
    ):
        vm.console  # noqa: B018


def test_log_dir_keeps_transcript(bios: str, tmp_path: Path) -> None:
    with Machine(guest.tiny.config(bios, qemu=QEMU, log_dir=str(tmp_path), name="kept")) as vm:
        vm.console.expect(guest.tiny.READY, timeout=10)
        kept = vm.log_dir
    assert kept is not None and Path(kept, "console.log").read_text().startswith("TINY-GUEST")
    assert Path(kept, "qemu.log").exists()


def test_async_console(bios: str) -> None:
    async def main() -> None:
        async with AsyncMachine(guest.tiny.config(bios, qemu=QEMU)) as vm:
            await vm.console.expect(guest.tiny.READY, timeout=10)
            vm.console.send("ping")
            assert (await vm.console.expect(re.compile("p.ng"), timeout=5)).text == "ping"
            vm.console.send("rest")
            assert await vm.console.settle(0.2, timeout=5) == "rest"
            # the task runs (and starts waiting) before the loop can see QEMU exit
            waiter = asyncio.ensure_future(vm.console.expect("never", timeout=30))
            vm.console.send(b"~\x02")
            with pytest.raises(GuestError, match="console closed"):
                await waiter
            assert await vm.wait(timeout=10) == 5

    run_async(main())


# -- the buffer, no VM ----------------------------------------------------


def _expect_in_chunks(data: bytes, chunk: int, pattern: bytes) -> int:
    buf = ConsoleBuffer()
    rx = re.compile(re.escape(pattern))
    scanned = 0
    for i in range(0, len(data), chunk):
        buf.feed(data[i : i + chunk])
        found = buf.search([rx], scanned)
        scanned = buf.total
        if found is not None:
            return found[1].start() + (buf.total - len(buf.data))
    return -1


def test_match_straddling_reads_is_found() -> None:
    data = b"x" * 1000 + b"MARKER" + b"y" * 10
    for chunk in (1, 3, 7, 1000, 1003):
        assert _expect_in_chunks(data, chunk, b"MARKER") == 1000


def test_buffer_is_bounded_and_tail_visible() -> None:
    buf = ConsoleBuffer(max_buffer=1000)
    for _ in range(100):
        buf.feed(b"z" * 100)
    assert len(buf.data) == 1000 and buf.total == 10000
    buf.feed(b"\x1b[6n\r\n")
    assert buf.tail().endswith("\\x1b[6n\\r\n")
    assert visible(b"a\tb\x00") == "a\tb\\x00"  # tabs stay, NUL is shown


def test_search_cost_does_not_grow_with_the_buffer() -> None:
    """Each search looks at the new bytes plus a fixed window, not the buffer."""
    buf = ConsoleBuffer(max_buffer=64 * 1024 * 1024)
    seen: list[int] = []

    class Spy:
        pattern = b"never"

        def search(self, data: bytearray, pos: int) -> None:
            seen.append(len(data) - pos)
            return None

    scanned = 0
    for _ in range(200):
        buf.feed(b"q" * 4096)
        buf.search([Spy()], scanned)  # type: ignore[list-item]
        scanned = buf.total
    assert max(seen) <= 4096 + buf.window


def test_follow_gives_what_is_held_then_every_chunk_once() -> None:
    """`follow` (used by `vmpilot run -- CMD`): the unconsumed buffer first,
    then each chunk as it comes; none missed or seen twice, on both faces."""
    import socket

    from vmpilot.console import AsyncConsole, Console

    ours, peer = socket.socketpair()
    con = Console(ours)
    try:
        seen: list[bytes] = []
        peer.sendall(b"before\n")
        con.expect(re.compile(rb"bef(?=ore\n)"), timeout=10)  # "ore\n" stays held
        con.follow(seen.append)
        peer.sendall(b"after")
        con.expect("after", timeout=10)  # listeners run before expect sees the chunk
        assert b"".join(seen) == b"ore\nafter"
    finally:
        con.close()
        peer.close()

    async def main() -> bytes:
        ours, peer = socket.socketpair()
        con = AsyncConsole(ours)
        try:
            seen: list[bytes] = []
            peer.sendall(b"before\n")
            await con.expect(re.compile(rb"bef(?=ore\n)"), timeout=10)
            con.follow(seen.append)
            peer.sendall(b"after")
            await con.expect("after", timeout=10)
            return b"".join(seen)
        finally:
            con.close()
            peer.close()

    assert run_async(main()) == b"ore\nafter"
