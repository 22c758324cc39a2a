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

import asyncio
import functools
import socket
import subprocess
import threading
from typing import Any, TypeVar

from ._util.deadline import Deadline, Within
from ._util.plan import Call, Plan, arun, run
from .errors import QtestClosed, QtestError, Timeout

__all__ = [
    "AsyncQtest",
    "Qtest",
    "QtestClosed",
    "QtestError",
    "QtestProtocol",
    "qtest_available",
]

DEFAULT_TIMEOUT = 30.0  # seconds a qtest command waits for its answer unless told otherwise
T = TypeVar("T")


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


# -- the operations, written once as plans (see `_util.plan`) -------------
# A face supplies `_send(data)` and `_recv(deadline) -> bytes` (b"" at EOF;
# `TimeoutError` past the deadline) and runs these under its lock.


class _Core:
    """One channel's protocol state and the replies read ahead."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.proto = QtestProtocol()
        self.replies: list[str] = []


def _request(core: _Core, line: str, timeout: Within) -> Plan[str]:
    data = core.proto.command(line)
    deadline = Deadline.of(timeout)
    word = (line.split() or [""])[0]
    try:
        yield Call("_send", data, deadline)
    except TimeoutError:
        raise Timeout(f"qtest to take {word!r}", deadline.timeout) from None
    while not core.replies:
        if deadline.expired:  # IRQ lines that keep coming must not carry us past it
            raise Timeout(f"qtest's answer to {word!r}", deadline.timeout)
        try:
            chunk = yield Call("_recv", deadline)
        except TimeoutError:
            raise Timeout(f"qtest's answer to {word!r}", deadline.timeout) from None
        if not chunk:
            raise QtestClosed(f"{core.name}: QEMU closed the qtest channel")
        core.replies += core.proto.receive_data(chunk)
    return core.replies.pop(0)


def _command(core: _Core, words: tuple[object, ...], timeout: Within) -> Plan[list[str]]:
    line = " ".join(str(w) for w in words)
    return _ok(line, (yield from _request(core, line, timeout)))


def _number(core: _Core, *words: object) -> Plan[int]:
    return int((yield from _command(core, words, DEFAULT_TIMEOUT))[0], 0)


def _done(core: _Core, *words: object) -> Plan[None]:
    yield from _command(core, words, DEFAULT_TIMEOUT)


def _read_bytes(core: _Core, addr: int, size: int) -> Plan[bytes]:
    if size <= 0:
        return b""
    text = (yield from _command(core, ("read", hex(addr), size), DEFAULT_TIMEOUT))[0]
    return bytes.fromhex(text.removeprefix("0x"))


def _write_bytes(core: _Core, addr: int, data: bytes) -> Plan[None]:
    if data:
        yield from _done(core, "write", hex(addr), len(data), "0x" + data.hex())


def _clock_step(core: _Core, ns: int | None) -> Plan[int]:
    return (yield from _number(core, "clock_step", *([] if ns is None else [ns])))


class Qtest:
    """Blocking qtest client over a connected socket (thread-safe)."""

    def __init__(self, sock: socket.socket, name: str = "qtest") -> None:
        self._sock: socket.socket | None = sock
        sock.setblocking(True)
        self.name = name
        self._core = _Core(name)
        self._lock = threading.Lock()

    def _run(self, plan: Plan[T]) -> T:
        with self._lock:
            return run(plan, self)

    def _channel(self) -> socket.socket:
        if self._sock is None:
            raise QtestClosed(f"{self.name}: the channel is closed")
        return self._sock

    def _send(self, data: bytes, deadline: Deadline) -> None:
        sock = self._channel()
        sock.settimeout(deadline.remaining())
        try:
            sock.sendall(data)
        except BlockingIOError:  # a zero timeout
            raise TimeoutError from None
        except TimeoutError:
            raise
        except OSError as exc:
            raise QtestClosed(f"{self.name}: cannot send: {exc}") from exc

    def _recv(self, deadline: Deadline) -> bytes:
        sock = self._channel()
        sock.settimeout(deadline.remaining())
        try:
            return sock.recv(65536)
        except BlockingIOError:  # a zero timeout
            raise TimeoutError from None
        except TimeoutError:
            raise
        except OSError as exc:
            raise QtestClosed(f"{self.name}: {exc}") from exc

    def command(self, *words: object, timeout: Within = DEFAULT_TIMEOUT) -> list[str]:
        """Send one command; the words after `OK`, or `QtestError`."""
        return self._run(_command(self._core, words, timeout))

    def request(self, line: str, *, timeout: Within = DEFAULT_TIMEOUT) -> str:
        """Send one command line; QEMU's answer line as it is (`OK ...`/`FAIL ...`)."""
        return self._run(_request(self._core, line, timeout))

    # clock
    def clock_step(self, ns: int | None = None) -> int:
        """Advance the virtual clock (by `ns`, or to the next timer); the new time."""
        return self._run(_clock_step(self._core, ns))

    def clock_set(self, ns: int) -> int:
        """Set the virtual clock to `ns` nanoseconds; returns the clock QEMU reports."""
        return self._run(_number(self._core, "clock_set", ns))

    # memory
    def readb(self, addr: int) -> int:
        """The 8-bit value at guest physical address `addr`."""
        return self._run(_number(self._core, "readb", hex(addr)))

    def readw(self, addr: int) -> int:
        """The 16-bit value at guest physical address `addr`."""
        return self._run(_number(self._core, "readw", hex(addr)))

    def readl(self, addr: int) -> int:
        """The 32-bit value at guest physical address `addr`."""
        return self._run(_number(self._core, "readl", hex(addr)))

    def readq(self, addr: int) -> int:
        """The 64-bit value at guest physical address `addr`."""
        return self._run(_number(self._core, "readq", hex(addr)))

    def writeb(self, addr: int, value: int) -> None:
        """Store the 8-bit `value` at guest physical address `addr`."""
        self._run(_done(self._core, "writeb", hex(addr), hex(value)))

    def writew(self, addr: int, value: int) -> None:
        """Store the 16-bit `value` at guest physical address `addr`."""
        self._run(_done(self._core, "writew", hex(addr), hex(value)))

    def writel(self, addr: int, value: int) -> None:
        """Store the 32-bit `value` at guest physical address `addr`."""
        self._run(_done(self._core, "writel", hex(addr), hex(value)))

    def writeq(self, addr: int, value: int) -> None:
        """Store the 64-bit `value` at guest physical address `addr`."""
        self._run(_done(self._core, "writeq", hex(addr), hex(value)))

    def read(self, addr: int, size: int) -> bytes:
        """`size` bytes of guest physical memory from `addr`."""
        return self._run(_read_bytes(self._core, addr, size))

    def write(self, addr: int, data: bytes) -> None:
        """Write `data` into guest physical memory at `addr`."""
        self._run(_write_bytes(self._core, addr, data))

    # I/O ports
    def inb(self, port: int) -> int:
        """The byte read from I/O port `port`."""
        return self._run(_number(self._core, "inb", hex(port)))

    def outb(self, port: int, value: int) -> None:
        """Write the byte `value` to I/O port `port`."""
        self._run(_done(self._core, "outb", hex(port), hex(value)))

    # interrupts
    def irq_intercept_in(self, qom_path: str) -> None:
        """Report the input IRQ lines of device `qom_path` (see `irq_level`)."""
        self._run(_done(self._core, "irq_intercept_in", qom_path))

    def irq_level(self, line: int) -> bool:
        """The last level QEMU reported for intercepted IRQ `line`."""
        return self._core.proto.irq_levels.get(line, False)

    def close(self) -> None:
        """Close the qtest socket (a second call does nothing)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


class AsyncQtest:
    """The asyncio twin of `Qtest`: the same operations (the same plans)."""

    def __init__(self, sock: socket.socket, name: str = "qtest") -> None:
        self._sock: socket.socket | None = sock
        sock.setblocking(False)
        self.name = name
        self._core = _Core(name)
        self._lock = asyncio.Lock()

    async def _run(self, plan: Plan[T]) -> T:
        async with self._lock:
            return await arun(plan, self)

    def _channel(self) -> socket.socket:
        if self._sock is None:
            raise QtestClosed(f"{self.name}: the channel is closed")
        return self._sock

    async def _send(self, data: bytes, deadline: Deadline) -> None:
        send = asyncio.get_running_loop().sock_sendall(self._channel(), data)
        try:
            await asyncio.wait_for(send, deadline.remaining())
        except (TimeoutError, asyncio.TimeoutError):
            raise TimeoutError from None
        except OSError as exc:
            raise QtestClosed(f"{self.name}: cannot send: {exc}") from exc

    async def _recv(self, deadline: Deadline) -> bytes:
        recv = asyncio.get_running_loop().sock_recv(self._channel(), 65536)
        try:
            return await asyncio.wait_for(recv, deadline.remaining())
        except (TimeoutError, asyncio.TimeoutError):
            raise TimeoutError from None
        except OSError as exc:
            raise QtestClosed(f"{self.name}: {exc}") from exc

    async def command(self, *words: object, timeout: Within = DEFAULT_TIMEOUT) -> list[str]:
        """Send one command; the words after `OK`, or `QtestError`."""
        return await self._run(_command(self._core, words, timeout))

    async def request(self, line: str, *, timeout: Within = DEFAULT_TIMEOUT) -> str:
        """Send one command line; QEMU's answer line as it is (`OK ...`/`FAIL ...`)."""
        return await self._run(_request(self._core, line, timeout))

    async def clock_step(self, ns: int | None = None) -> int:
        """Advance the virtual clock (by `ns`, or to the next timer); the new time."""
        return await self._run(_clock_step(self._core, ns))

    async def clock_set(self, ns: int) -> int:
        """Set the virtual clock to `ns` nanoseconds; returns the clock QEMU reports."""
        return await self._run(_number(self._core, "clock_set", ns))

    async def readb(self, addr: int) -> int:
        """The 8-bit value at guest physical address `addr`."""
        return await self._run(_number(self._core, "readb", hex(addr)))

    async def readw(self, addr: int) -> int:
        """The 16-bit value at guest physical address `addr`."""
        return await self._run(_number(self._core, "readw", hex(addr)))

    async def readl(self, addr: int) -> int:
        """The 32-bit value at guest physical address `addr`."""
        return await self._run(_number(self._core, "readl", hex(addr)))

    async def readq(self, addr: int) -> int:
        """The 64-bit value at guest physical address `addr`."""
        return await self._run(_number(self._core, "readq", hex(addr)))

    async def writeb(self, addr: int, value: int) -> None:
        """Store the 8-bit `value` at guest physical address `addr`."""
        await self._run(_done(self._core, "writeb", hex(addr), hex(value)))

    async def writew(self, addr: int, value: int) -> None:
        """Store the 16-bit `value` at guest physical address `addr`."""
        await self._run(_done(self._core, "writew", hex(addr), hex(value)))

    async def writel(self, addr: int, value: int) -> None:
        """Store the 32-bit `value` at guest physical address `addr`."""
        await self._run(_done(self._core, "writel", hex(addr), hex(value)))

    async def writeq(self, addr: int, value: int) -> None:
        """Store the 64-bit `value` at guest physical address `addr`."""
        await self._run(_done(self._core, "writeq", hex(addr), hex(value)))

    async def read(self, addr: int, size: int) -> bytes:
        """`size` bytes of guest physical memory from `addr`."""
        return await self._run(_read_bytes(self._core, addr, size))

    async def write(self, addr: int, data: bytes) -> None:
        """Write `data` into guest physical memory at `addr`."""
        await self._run(_write_bytes(self._core, addr, data))

    async def inb(self, port: int) -> int:
        """The byte read from I/O port `port`."""
        return await self._run(_number(self._core, "inb", hex(port)))

    async def outb(self, port: int, value: int) -> None:
        """Write the byte `value` to I/O port `port`."""
        await self._run(_done(self._core, "outb", hex(port), hex(value)))

    async def irq_intercept_in(self, qom_path: str) -> None:
        """Report the input IRQ lines of device `qom_path` (see `irq_level`)."""
        await self._run(_done(self._core, "irq_intercept_in", qom_path))

    def irq_level(self, line: int) -> bool:
        """The last level QEMU reported for intercepted IRQ `line`."""
        return self._core.proto.irq_levels.get(line, False)

    def close(self) -> None:
        """Close the qtest socket (a second call does nothing)."""
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
