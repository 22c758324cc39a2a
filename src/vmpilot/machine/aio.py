"""`AsyncMachine`: one VM driven from asyncio. Its operations are the plans
of `_plans` (the same as `Machine`'s), awaited by `_util.plan.arun` with the
coroutine primitives of `_AsyncIO`."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from .._util.deadline import Deadline
from .._util.plan import arun
from ..console import AsyncConsole
from ..qga import AsyncGuestAgent
from ..qmp import AsyncQMPClient, Event
from ..qmp.events import NameFilter
from ..qtest import AsyncQtest
from ..shell import AsyncShell
from . import _plans
from ._common import (
    AGENT_TIMEOUT,
    COMMAND_TIMEOUT,
    LAUNCH_TIMEOUT,
    SHUTDOWN_TIMEOUT,
    WAIT_TIMEOUT,
    Common,
    configured,
    make_config,
)
from ._plans import FINISH_TIMEOUT, VERDICT_EVENTS, Method
from .config import MachineConfig
from .lifecycle import Lifecycle, State
from .storage import AsyncStorage


class AsyncMachine(AsyncStorage, Common):
    """A QEMU VM driven from asyncio; the same contract (and the same plans) as `Machine`."""

    def __init__(self, config: MachineConfig | None = None, **overrides: Any) -> None:
        self._life = Lifecycle(make_config(config, overrides))
        self._qmp: AsyncQMPClient | None = None
        self._console: AsyncConsole | None = None
        self._agent: AsyncGuestAgent | None = None
        self._qtest: AsyncQtest | None = None
        self._exited = asyncio.Event()
        self._op_lock = asyncio.Lock()
        self._io = _AsyncIO(self)

    async def launch(self, *, timeout: float | None = LAUNCH_TIMEOUT) -> AsyncMachine:
        """Start QEMU; return once QMP is negotiated, or raise `LaunchError`."""
        async with self._op_lock:
            await arun(_plans.launch(self._life, Deadline(timeout)), self._io)
        return self

    def _on_exit(self) -> None:
        life = self._life
        assert life.proc is not None
        asyncio.get_running_loop().remove_reader(life.pidfd)
        rc = life.proc.poll()  # the pidfd is readable: the child is a zombie now
        if rc is None:
            life.reap(timeout=1)
        else:
            life.record_exit(rc)
        self._exited.set()
        if life.claim(State.RUNNING, State.SHUTTING_DOWN):  # nobody asked: died or exited
            life.cleanup()

    # -- channels ---------------------------------------------------------

    @property
    def console(self) -> AsyncConsole:
        """The serial console (needs `serial=True`); stays readable after the VM stops."""
        return configured(self._console, "console", "serial")

    @property
    def agent(self) -> AsyncGuestAgent:
        """The guest agent client (needs `agent=True` and qemu-ga in the guest)."""
        return configured(self._agent, "agent channel", "agent")

    @property
    def qtest(self) -> AsyncQtest:
        """The qtest channel (needs `qtest=True`, usually with `accel="qtest"`)."""
        return configured(self._qtest, "qtest channel", "qtest")

    async def wait_for_agent(self, *, timeout: float | None = AGENT_TIMEOUT) -> AsyncGuestAgent:
        """Until qemu-ga answers in the guest (it starts late in boot)."""
        await self.agent.sync(timeout=timeout)
        return self.agent

    @property
    def shell(self) -> AsyncShell:
        """Run commands in the guest's console shell (the bundled guest's prompt)."""
        return AsyncShell(self.console)

    @property
    def qmp(self) -> AsyncQMPClient:
        """The QMP client (raises `VMError` when the VM was never up)."""
        return self._connected(self._qmp)

    async def execute(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = COMMAND_TIMEOUT,
    ) -> Any:
        """Run QMP command `name` on this VM; its `return` value, or `CommandError`."""
        return await self.qmp.execute(name, arguments, timeout=timeout)

    async def add_fd(
        self,
        fd: int,
        fdset_id: int,
        opaque: str | None = None,
        *,
        timeout: float | None = COMMAND_TIMEOUT,
    ) -> dict[str, Any] | None:
        """See `Machine.add_fd`."""
        if self._life.state is State.NEW:
            self._preset_fd(fd, fdset_id, opaque)
            return None
        return await self.qmp.add_fd(fd, fdset_id=fdset_id, opaque=opaque, timeout=timeout)

    async def send_fd(self, fd: int, name: str, *, timeout: float | None = COMMAND_TIMEOUT) -> None:
        """See `Machine.send_fd`."""
        await self.qmp.send_fd(fd, name, timeout=timeout)

    async def wait_event(
        self,
        name: NameFilter = None,
        match: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = COMMAND_TIMEOUT,
    ) -> Event:
        """The oldest event matching `name` and `match` (see `QMPClient.wait_event`)."""
        return await self.qmp.wait_event(name, match, timeout=timeout)

    def events(self, *, timeout: float | None = COMMAND_TIMEOUT) -> Any:
        """Events as they arrive (`async for`), each wait bounded by `timeout`."""
        return self.qmp.events(timeout=timeout)

    async def forwarded_port(
        self, guest_port: int, *, timeout: float | None = COMMAND_TIMEOUT
    ) -> int:
        """The host port (on 127.0.0.1) forwarded to `guest_port`: as
        configured, or, for a 0 in `forwards`, the one QEMU bound (asked of
        QEMU with HMP `info usernet`: the kernel chose it, so no race)."""
        host = self._configured_forward(guest_port)
        if host:
            return host
        usernet = await self.execute(
            "human-monitor-command", {"command-line": "info usernet"}, timeout=timeout
        )
        return self._usernet_port(guest_port, usernet)

    # -- ending -----------------------------------------------------------

    async def shutdown(
        self, method: Method = "quit", *, timeout: float | None = SHUTDOWN_TIMEOUT
    ) -> None:
        """Graceful: see `Machine.shutdown`."""
        async with self._op_lock:
            await arun(_plans.shutdown(self._life, method, Deadline(timeout)), self._io)

    async def wait(self, *, timeout: float | None = WAIT_TIMEOUT) -> int | None:
        """See `Machine.wait`."""
        async with self._op_lock:
            return await arun(_plans.wait(self._life, Deadline(timeout)), self._io)

    async def kill(self) -> None:
        """Hard stop on purpose (SIGKILL); raises nothing."""
        async with self._op_lock:
            await arun(_plans.kill(self._life), self._io)

    async def __aenter__(self) -> AsyncMachine:
        if self._life.state is State.NEW:
            await self.launch()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            await self.kill()
        else:
            await self.shutdown()


class _AsyncIO:
    """`AsyncMachine`'s asyncio primitives for the plans (see `_plans`)."""

    def __init__(self, vm: AsyncMachine) -> None:
        self.vm = vm
        self.life = vm._life
        self.socks: dict[str, socket.socket] = {}

    async def start(self) -> None:
        self.socks = self.life.start()
        loop = asyncio.get_running_loop()
        loop.add_reader(self.life.pidfd, self.vm._on_exit)
        self.life.on_cleanup.append(lambda: self._stop_watching(loop))

    async def connect(self) -> None:
        try:
            self._wrap()
        except BaseException:
            for sock in self.socks.values():  # those not wrapped yet (closing twice is harmless)
                sock.close()
            raise

    def _wrap(self) -> None:
        vm, life, socks = self.vm, self.life, self.socks
        name = vm._vm_name()
        if "serial" in socks:
            vm._console = AsyncConsole(socks["serial"], life.console_path, name)
            life.on_cleanup.append(vm._console.close)
        if "agent" in socks:
            vm._agent = AsyncGuestAgent(socks["agent"], f"guest agent of {name}")
            life.on_cleanup.append(vm._agent.close)
        if "qtest" in socks:
            vm._qtest = AsyncQtest(socks["qtest"], f"qtest of {name}")
            life.on_cleanup.append(vm._qtest.close)
        vm._qmp = AsyncQMPClient(socks["qmp"], name=name)
        vm._qmp.add_listener(life.record_event, VERDICT_EVENTS)  # why QEMU stopped
        life.on_cleanup.insert(0, self._close_qmp)

    def _close_qmp(self) -> None:
        """The first cleanup step. QEMU gone: take what it sent last (a
        client's `quit` answered, SHUTDOWN) before closing."""
        qmp = self.vm._qmp
        assert qmp is not None
        if self.life.returncode is not None and _loop_running():
            qmp._read_to_end()  # not from abandon() in another thread: the client is the loop's
        qmp.close()

    def _stop_watching(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.life.pidfd >= 0:
            loop.remove_reader(self.life.pidfd)

    async def read_greeting(self, deadline: Deadline) -> None:
        assert self.vm._qmp is not None
        await self.vm._qmp.read_greeting(timeout=deadline.remaining())

    async def negotiate(self, deadline: Deadline) -> None:
        assert self.vm._qmp is not None
        await self.vm._qmp.negotiate(timeout=deadline.remaining())

    async def running(self) -> None:
        pass  # the pidfd is watched from `start` on

    async def execute(self, command: str, deadline: Deadline) -> Any:
        assert self.vm._qmp is not None
        return await self.vm._qmp.execute(command, timeout=deadline.remaining())

    async def wait_exited(self, deadline: Deadline) -> bool:
        exited = self.vm._exited
        if exited.is_set():
            return True
        try:
            await asyncio.wait_for(exited.wait(), deadline.remaining())
        except asyncio.TimeoutError:
            return False
        return True

    async def kill_process(self) -> None:
        self.life.kill_process()

    async def cleanup(self) -> None:
        life = self.life
        if life.returncode is None:
            life.reap(timeout=FINISH_TIMEOUT)
        life.cleanup()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
