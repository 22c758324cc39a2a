"""qtest: the protocol against a scripted peer, and real QEMU where its
build has the qtest accelerator (Debian's has not: those tests skip)."""

from __future__ import annotations

import socket
import threading

import pytest
from conftest import QEMU

from vmpilot import LaunchError
from vmpilot.qtest import Qtest, QtestError, QtestMachine, QtestProtocol, qtest_available

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


def test_client_against_a_scripted_peer() -> None:
    ours, theirs = socket.socketpair()
    memory = {0x1000: 0xAB}
    seen: list[str] = []

    def peer() -> None:
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
            else:
                theirs.sendall(b"FAIL unknown command\n")
        theirs.close()

    t = threading.Thread(target=peer)
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
    finally:
        qt.close()
        t.join(10)
    assert seen[:2] == ["readb 0x1000", "writeb 0x2000 0x5a"]


@pytest.mark.skipif(HAS_QTEST, reason="this QEMU has qtest")
def test_machine_refuses_clearly_without_qtest() -> None:
    vm = QtestMachine(machine="pc", qemu=QEMU)
    with pytest.raises(LaunchError, match="without the qtest accelerator"):
        vm.launch()
    assert vm.state == "new" and vm.pid is None


@pytest.mark.skipif(not HAS_QTEST, reason=f"{QEMU} has no qtest accelerator (-accel help)")
def test_real_qtest_memory_and_clock() -> None:
    with QtestMachine(machine="pc", memory=32, qemu=QEMU) as vm:
        qt = vm.qtest
        qt.writel(0x1000, 0xDEADBEEF)
        assert qt.readl(0x1000) == 0xDEADBEEF
        qt.write(0x2000, b"hello")
        assert qt.read(0x2000, 5) == b"hello"
        assert qt.clock_step(1_000_000) >= 1_000_000
