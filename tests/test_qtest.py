"""qtest: the protocol against a scripted peer, and real QEMU where its
build has the qtest accelerator (Debian's has not: those tests skip)."""

from __future__ import annotations

import inspect
import socket
import threading

import pytest
from conftest import QEMU, run_async

from vmpilot import LaunchError, Timeout
from vmpilot.qtest import (
    AsyncQtest,
    Qtest,
    QtestError,
    QtestMachine,
    QtestProtocol,
    qtest_available,
)

HAS_QTEST = qtest_available(QEMU)


def test_protocol_framing_and_irq_lines() -> None:
    p = QtestProtocol()
    assert p.command("readb", "0x10") == b"readb 0x10\n"
    assert p.receive_data(b"IRQ raise 3\nOK 0x") == []
    assert p.irq_levels == {3: True}
    assert p.receive_data(b"7f\nIRQ lower 3\n") == ["OK 0x7f"]
    assert p.irq_levels == {3: False}
    with pytest.raises(ValueError, match="newline"):
        p.command("readb", "1\nwriteb")


def _scripted_peer(theirs: socket.socket, memory: dict[int, int], seen: list[str]) -> None:
    f = theirs.makefile("rb")
    for raw in f:
        line = raw.decode().strip()
        seen.append(line)
        words = line.split()
        if words[0] == "readb":
            theirs.sendall(b"IRQ raise 1\nOK 0x%x\n" % memory.get(int(words[1], 16), 0))
        elif words[0] == "writeb":
            memory[int(words[1], 16)] = int(words[2], 16)
            theirs.sendall(b"OK\n")
        elif words[0] == "clock_step":
            theirs.sendall(b"OK 1000\n")
        elif words[0] == "read":
            theirs.sendall(b"OK 0x0102\n")
        elif words[0] == "silence":
            continue  # never answered: the caller's timeout must end the wait
        else:
            theirs.sendall(b"FAIL unknown command\n")
    theirs.close()


def test_client_against_a_scripted_peer() -> None:
    ours, theirs = socket.socketpair()
    memory = {0x1000: 0xAB}
    seen: list[str] = []
    t = threading.Thread(target=_scripted_peer, args=(theirs, memory, seen))
    t.start()
    qt = Qtest(ours)
    try:
        assert qt.readb(0x1000) == 0xAB and qt.irq_level(1)
        qt.writeb(0x2000, 0x5A)
        assert memory[0x2000] == 0x5A
        assert qt.clock_step(1000) == 1000
        assert qt.read(0x10, 2) == b"\x01\x02"
        with pytest.raises(QtestError, match="FAIL unknown command"):
            qt.command("bogus")
        with pytest.raises(Timeout, match="qtest's answer to 'silence'"):
            qt.command("silence", timeout=0.2)
    finally:
        qt.close()
        t.join(10)
    assert seen[:2] == ["readb 0x1000", "writeb 0x2000 0x5a"]


def test_async_client_against_a_scripted_peer() -> None:
    ours, theirs = socket.socketpair()
    memory = {0x1000: 0xAB}
    seen: list[str] = []
    t = threading.Thread(target=_scripted_peer, args=(theirs, memory, seen))
    t.start()

    async def main() -> None:
        qt = AsyncQtest(ours)
        try:
            assert await qt.readb(0x1000) == 0xAB and qt.irq_level(1)
            await qt.writeb(0x2000, 0x5A)
            assert memory[0x2000] == 0x5A
            assert await qt.clock_step(1000) == 1000
            assert await qt.read(0x10, 2) == b"\x01\x02"
            with pytest.raises(QtestError, match="FAIL unknown command"):
                await qt.command("bogus")
            with pytest.raises(Timeout, match="qtest's answer to 'silence'"):
                await qt.command("silence", timeout=0.2)
        finally:
            qt.close()

    try:
        run_async(main())
    finally:
        t.join(10)
    assert seen[:2] == ["readb 0x1000", "writeb 0x2000 0x5a"]


def test_qtest_clients_are_twins() -> None:
    names = {n for n in dir(Qtest) if not n.startswith("_")}
    assert names == {n for n in dir(AsyncQtest) if not n.startswith("_")}
    for n in names:
        a, b = inspect.signature(getattr(Qtest, n)), inspect.signature(getattr(AsyncQtest, n))
        assert list(a.parameters.values()) == list(b.parameters.values()), n


@pytest.mark.skipif(HAS_QTEST, reason="this QEMU has qtest")
def test_machine_refuses_clearly_without_qtest() -> None:
    vm = QtestMachine(machine="pc", qemu=QEMU)
    with pytest.raises(LaunchError, match="without the qtest accelerator"):
        vm.launch()
    assert vm.state == "new" and vm.pid is None


@pytest.mark.skipif(not HAS_QTEST, reason=f"{QEMU} has no qtest accelerator")
def test_real_qtest_memory_and_clock() -> None:
    with QtestMachine(machine="pc", memory=32, qemu=QEMU) as vm:
        qt = vm.qtest
        qt.writel(0x1000, 0xDEADBEEF)
        assert qt.readl(0x1000) == 0xDEADBEEF
        qt.write(0x2000, b"hello")
        assert qt.read(0x2000, 5) == b"hello"
        assert qt.clock_step(1_000_000) >= 1_000_000
        for width, write, read in (
            (1, qt.writeb, qt.readb), (2, qt.writew, qt.readw),
            (4, qt.writel, qt.readl), (8, qt.writeq, qt.readq),
        ):  # fmt: skip
            value = int.from_bytes(bytes(range(0xA1, 0xA1 + width)), "little")
            write(0x3000, value)
            assert read(0x3000) == value
            assert qt.read(0x3000, width) == value.to_bytes(width, "little")  # little-endian RAM
        now = qt.clock_step()  # to the next timer
        assert qt.clock_set(now + 5000) == now + 5000


@pytest.mark.skipif(not HAS_QTEST, reason=f"{QEMU} has no qtest accelerator")
def test_real_qtest_rtc_interrupt() -> None:
    """The RTC's periodic interrupt, seen on the intercepted IOAPIC line 8 (as QEMU's rtc-test)."""

    def cmos(reg: int, value: int | None = None) -> int:
        qt.outb(0x70, reg)
        if value is not None:
            qt.outb(0x71, value)
        return qt.inb(0x71)

    rtc_on_virtual_clock = ["-rtc", "clock=vm"]  # else it follows the host clock, not clock_step
    with QtestMachine(machine="pc", memory=32, qemu=QEMU, extra_args=rtc_on_virtual_clock) as vm:
        qt = vm.qtest
        qt.irq_intercept_in("ioapic")
        cmos(0x0A, 0x26)  # 32.768 kHz base, 1024 Hz periodic rate
        cmos(0x0B, cmos(0x0B) | 0x40)  # periodic interrupt enable
        cmos(0x0C)  # acknowledge anything pending
        assert not qt.irq_level(8)
        qt.clock_step(10_000_000)  # 10 ms of virtual time: ~10 periods
        assert qt.irq_level(8)
        cmos(0x0C)  # reading register C lowers the line
        assert not qt.irq_level(8)
