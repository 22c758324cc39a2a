"""The qtest protocol: drive a machine's devices and clock directly.

QEMU started with `-accel qtest -qtest chardev:...` runs no guest code; a
test reads and writes guest memory and I/O ports, steps the virtual clock and
watches interrupt lines. The protocol is text lines: a command, then `OK ...`
or `FAIL ...`; `IRQ raise N` / `IRQ lower N` lines may arrive at any time.

Debian's QEMU packages delete the qtest accelerator module; `qtest_available()`
tries whether a binary has it, and `QtestMachine` refuses clearly without it.
A VM gets this channel with `MachineConfig(qtest=True)`, as `vm.qtest`.
"""

from __future__ import annotations

import functools
import socket
import subprocess
import threading
from typing import Any

from ._util.deadline import Deadline
from .errors import Timeout, VMError

DEFAULT_TIMEOUT = 30.0


class QtestError(VMError):
    """QEMU answered a qtest command with FAIL/ERR."""


_PROBE = b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'


@functools.lru_cache(maxsize=8)
def qtest_available(qemu: str) -> bool:
    """Whether `qemu` starts under `-accel qtest` (tried: `-accel help` cannot
    tell, QEMU leaves qtest out of that list on purpose)."""
    argv = [qemu, "-machine", "none", "-accel", "qtest", "-nodefaults", "-no-user-config"]
    try:
        proc = subprocess.run(
            [*argv, "-display", "none", "-qmp", "stdio"],
            input=_PROBE, capture_output=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and b'"SHUTDOWN"' in proc.stdout


class QtestProtocol:
    """Line framing and the IRQ state, no I/O."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.irq_levels: dict[int, bool] = {}

    @staticmethod
    def command(*words: object) -> bytes:
        line = " ".join(str(w) for w in words)
        if "\n" in line:
            raise ValueError(f"qtest command contains a newline: {line!r}")
        return line.encode() + b"\n"

    def receive_data(self, data: bytes) -> list[str]:
        """Replies (`OK ...`/`FAIL ...`) in `data`; IRQ lines update `irq_levels`."""
        self._buf += data
        replies: list[str] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                return replies
            line = self._buf[:nl].decode(errors="replace").rstrip("\r")
            del self._buf[: nl + 1]
            words = line.split()
            if len(words) == 3 and words[0] == "IRQ" and words[1] in ("raise", "lower"):
                self.irq_levels[int(words[2], 0)] = words[1] == "raise"
            elif line:
                replies.append(line)


def _ok(command: str, reply: str) -> list[str]:
    words = reply.split()
    if not words or words[0] != "OK":
        raise QtestError(f"qtest {command!r} failed: {reply}")
    return words[1:]


class Qtest:
    """Blocking qtest client over a connected socket (thread-safe)."""

    def __init__(self, sock: socket.socket, name: str = "qtest") -> None:
        self._sock: socket.socket | None = sock
        sock.setblocking(True)
        self.name = name
        self._proto = QtestProtocol()
        self._replies: list[str] = []
        self._lock = threading.Lock()

    def command(self, *words: object, timeout: float | None = DEFAULT_TIMEOUT) -> list[str]:
        """Send one command; the words after `OK`, or `QtestError`."""
        reply = self.request(" ".join(str(w) for w in words), timeout=timeout)
        return _ok(" ".join(map(str, words)), reply)

    def request(self, line: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> str:
        """Send one command line; QEMU's answer line as it is (`OK ...`/`FAIL ...`)."""
        data = self._proto.command(line)
        words = line.split() or [""]
        with self._lock:
            sock = self._sock
            if sock is None:
                raise VMError(f"{self.name}: the channel is closed")
            sock.sendall(data)
            deadline = Deadline(timeout)
            while not self._replies:
                sock.settimeout(deadline.remaining())
                try:
                    chunk = sock.recv(65536)
                except (TimeoutError, BlockingIOError):
                    raise Timeout(f"qtest's answer to {words[0]!r}", timeout) from None
                if not chunk:
                    raise VMError(f"{self.name}: QEMU closed the qtest channel")
                self._replies += self._proto.receive_data(chunk)
            return self._replies.pop(0)

    # clock
    def clock_step(self, ns: int | None = None) -> int:
        """Advance the virtual clock (by `ns`, or to the next timer); the new time."""
        words = self.command("clock_step", *([] if ns is None else [ns]))
        return int(words[0])

    def clock_set(self, ns: int) -> int:
        return int(self.command("clock_set", ns)[0])

    # memory
    def _read(self, op: str, addr: int) -> int:
        return int(self.command(op, hex(addr))[0], 0)

    def readb(self, addr: int) -> int:
        return self._read("readb", addr)

    def readw(self, addr: int) -> int:
        return self._read("readw", addr)

    def readl(self, addr: int) -> int:
        return self._read("readl", addr)

    def readq(self, addr: int) -> int:
        return self._read("readq", addr)

    def writeb(self, addr: int, value: int) -> None:
        self.command("writeb", hex(addr), hex(value))

    def writew(self, addr: int, value: int) -> None:
        self.command("writew", hex(addr), hex(value))

    def writel(self, addr: int, value: int) -> None:
        self.command("writel", hex(addr), hex(value))

    def writeq(self, addr: int, value: int) -> None:
        self.command("writeq", hex(addr), hex(value))

    def read(self, addr: int, size: int) -> bytes:
        if size <= 0:
            return b""
        text = self.command("read", hex(addr), size)[0]
        return bytes.fromhex(text.removeprefix("0x"))

    def write(self, addr: int, data: bytes) -> None:
        if data:
            self.command("write", hex(addr), len(data), "0x" + data.hex())

    # I/O ports
    def inb(self, port: int) -> int:
        return self._read("inb", port)

    def outb(self, port: int, value: int) -> None:
        self.command("outb", hex(port), hex(value))

    # interrupts
    def irq_intercept_in(self, qom_path: str) -> None:
        """Report the input IRQ lines of device `qom_path` (see `irq_level`)."""
        self.command("irq_intercept_in", qom_path)

    def irq_level(self, line: int) -> bool:
        """The last level QEMU reported for intercepted IRQ `line`."""
        return self._proto.irq_levels.get(line, False)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def __getattr__(name: str) -> Any:
    # `QtestMachine` is a Machine, so it lives in the machine package; this
    # channel module must not import upward, hence a lazy re-export
    if name == "QtestMachine":
        from .machine.qtest_machine import QtestMachine

        return QtestMachine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
