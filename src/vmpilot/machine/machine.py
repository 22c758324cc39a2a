"""`Machine` (blocking) and `AsyncMachine` (asyncio): one VM each, on the
shared `Lifecycle`, with the shutdown contract of DESIGN.md:

- `shutdown()` is graceful (QMP `quit`, or ACPI power-down) and, if QEMU does
  not exit in time or QMP fails, kills it and raises `AbnormalShutdown`;
- `wait()` sends nothing; a VM that does not exit in time is killed and the
  call raises;
- `kill()` is hard on purpose and raises nothing;
- the post-shutdown step runs exactly once, on every path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import select
import socket
import threading
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, Literal, TypeVar

from .._util.deadline import Deadline
from ..console import AsyncConsole, Console
from ..errors import LaunchError, QMPError, Timeout, VMError
from ..qga import AsyncGuestAgent, GuestAgent
from ..qmp import AsyncQMPClient, Event, QMPClient
from ..qmp._client import TimeoutArg
from ..qmp._transport import check_fd
from ..qmp.events import NameFilter
from ..shell import AsyncShell, Shell
from .config import MachineConfig
from .lifecycle import Lifecycle, State

LAUNCH_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 30.0
WAIT_TIMEOUT = 300.0
Method = Literal["quit", "powerdown"]
_METHODS = ("quit", "powerdown")


def _config(config: MachineConfig | None, overrides: dict[str, Any]) -> MachineConfig:
    if config is None:
        return MachineConfig(**overrides)
    if overrides:
        return dataclasses.replace(config, **overrides)
    return config


_C = TypeVar("_C")


def _configured(channel: _C | None, what: str, flag: str) -> _C:
    if channel is None:
        raise VMError(f"this VM has no {what}: configure it with {flag}=True")
    return channel


def _check_method(method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"shutdown method must be one of {_METHODS}, not {method!r}")


class _Common:
    """Read-only views shared by both flavours."""

    _life: Lifecycle

    @property
    def config(self) -> MachineConfig:
        return self._life.config

    @property
    def state(self) -> str:
        """`new`, `launching`, `running`, `shutting_down`, `stopped` or `failed`."""
        return self._life.state.value

    @property
    def pid(self) -> int | None:
        proc = self._life.proc
        return proc.pid if proc is not None else None

    @property
    def argv(self) -> list[str]:
        return list(self._life.argv)

    @property
    def accel(self) -> str:
        """The accelerator in use (`kvm`, `tcg`, ...); see `accel_reason`."""
        return self._life.accel

    @property
    def accel_reason(self) -> str:
        return self._life.accel_reason

    @property
    def exit_code(self) -> int | None:
        return self._life.exit_code

    @property
    def exit_signal(self) -> int | None:
        return self._life.exit_signal

    @property
    def crashed(self) -> bool:
        """QEMU died by a signal vmpilot did not send (SIGSEGV, SIGABRT, ...)."""
        return self._life.crashed

    @property
    def log(self) -> str:
        """QEMU's stdout and stderr (kept after the VM is gone)."""
        return self._life.log

    @property
    def log_path(self) -> str | None:
        """Path of QEMU's log while the VM exists (the temp dir goes at cleanup)."""
        return self._life.log_path if self._life.temp_dir else None

    @property
    def temp_dir(self) -> str | None:
        return self._life.temp_dir

    @property
    def qmp_path(self) -> str | None:
        """The unix socket other tools can use (`expose_qmp=True`), while running."""
        return self._life.qmp_path if self._life.temp_dir else None

    @property
    def pidfd(self) -> int:
        """A pidfd of QEMU (readable once it exits), -1 when there is none."""
        return self._life.pidfd

    @property
    def console_log(self) -> str:
        """The serial console transcript (kept after the VM is gone)."""
        return self._life.console_log

    @property
    def log_dir(self) -> str | None:
        """Where qemu.log and console.log are kept (with `log_dir=` in the config)."""
        return self._life.kept_log_dir

    def _preset_fd(self, fd: int, fdset_id: int, opaque: str | None) -> None:
        """Before launch: QEMU gets `fd` through `-add-fd` (fd set `fdset_id`)."""
        check_fd(fd)
        if isinstance(fdset_id, bool) or not isinstance(fdset_id, int) or fdset_id < 0:
            raise ValueError(f"fdset_id must be an int >= 0, not {fdset_id!r}")
        self._life.preset_fds.append((fd, fdset_id, opaque))

    def _connected(self, client: _C | None) -> _C:
        if client is None or self._life.state in (State.NEW, State.FAILED):
            raise VMError(f"the VM is {self.state}: no QMP connection")
        return client

    def _vm_name(self) -> str:
        proc = self._life.proc
        return self.config.name or (f"QEMU pid {proc.pid}" if proc else "QEMU")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.config.name or ''} pid={self.pid} {self.state}>"


class Machine(_Common):
    """A QEMU VM driven from blocking code.

    `Machine(config)` or `Machine(machine="none", memory=64, ...)`; then
    `launch()`, or `with Machine(...) as vm:` which launches and, on leaving,
    shuts down (or kills, if the block raised).
    """

    def __init__(self, config: MachineConfig | None = None, **overrides: Any) -> None:
        self._life = Lifecycle(_config(config, overrides))
        self._qmp: QMPClient | None = None
        self._console: Console | None = None
        self._agent: GuestAgent | None = None
        self._channels: dict[str, socket.socket] = {}
        self._exited = threading.Event()
        self._watcher: threading.Thread | None = None
        self._op_lock = threading.Lock()

    def launch(self, *, timeout: float | None = LAUNCH_TIMEOUT) -> Machine:
        """Start QEMU; return once QMP is negotiated, or raise `LaunchError`."""
        life = self._life
        deadline = Deadline(timeout)
        socks = life.start()
        if "serial" in socks:
            self._console = Console(socks["serial"], life.console_path, self._vm_name())
            life.on_cleanup.append(self._console.close)
        if "agent" in socks:
            self._agent = GuestAgent(socks["agent"], f"guest agent of {self._vm_name()}")
            life.on_cleanup.append(self._agent.close)
        self._channels = {k: v for k, v in socks.items() if k not in ("qmp", "serial", "agent")}
        for sock in self._channels.values():
            life.on_cleanup.append(sock.close)
        try:
            self._qmp = QMPClient.connect(socks["qmp"], connect_timeout=deadline.remaining())
        except Timeout as exc:
            raise life.launch_failed(f"no QMP greeting within {timeout:g} s", exc) from exc
        except (QMPError, OSError) as exc:
            # most often QEMU exited on a bad option; give it a moment to be reaped
            life.reap(timeout=deadline.remaining())
            raise life.launch_failed(f"QMP failed ({exc})", exc) from exc
        except BaseException as exc:
            raise life.launch_failed(f"interrupted ({exc!r})", exc) from exc
        life.on_cleanup.insert(0, self._qmp.close)
        life.state = State.RUNNING
        self._watcher = threading.Thread(
            target=self._watch,
            name=f"vmpilot-watch-{life.proc.pid if life.proc else 0}",
            daemon=True,
        )
        self._watcher.start()
        return self

    def _watch(self) -> None:
        """Notice QEMU's exit the moment it happens, whoever caused it."""
        life = self._life
        poller = select.poll()
        poller.register(life.pidfd, select.POLLIN)
        while not poller.poll(3_600_000):  # bounded by the VM's life; re-armed hourly
            pass
        life.reap(timeout=10)
        self._exited.set()
        if life.state is State.RUNNING:  # nobody asked: it died or exited on its own
            life.cleanup()

    # -- channels ---------------------------------------------------------

    @property
    def console(self) -> Console:
        """The serial console (needs `serial=True`); stays readable after the VM stops."""
        return _configured(self._console, "console", "serial")

    @property
    def agent(self) -> GuestAgent:
        """The guest agent client (needs `agent=True` and qemu-ga in the guest)."""
        return _configured(self._agent, "agent channel", "agent")

    def wait_for_agent(self, timeout: float = 120.0) -> GuestAgent:
        """Block until qemu-ga answers in the guest (it starts late in boot)."""
        self.agent.sync(timeout=timeout)
        return self.agent

    @property
    def shell(self) -> Shell:
        """Run commands in the guest's console shell (the bundled guest's prompt)."""
        return Shell(self.console)

    @property
    def qmp(self) -> QMPClient:
        """The QMP client (raises `VMError` when the VM was never up)."""
        return self._connected(self._qmp)

    def execute(
        self, name: str, arguments: Mapping[str, Any] | None = None, *, timeout: TimeoutArg = ...
    ) -> Any:
        return self.qmp.execute(name, arguments, timeout=timeout)

    def add_fd(self, fd: int, fdset_id: int, opaque: str | None = None) -> dict[str, Any] | None:
        """Put `fd` in fd set `fdset_id` (usable as `/dev/fdset/ID`): before
        launch through `-add-fd`, on a running VM through QMP `add-fd` (which
        returns QEMU's `{"fdset-id", "fd"}`)."""
        if self._life.state is State.NEW:
            self._preset_fd(fd, fdset_id, opaque)
            return None
        return self.qmp.add_fd(fd, fdset_id=fdset_id, opaque=opaque)

    def send_fd(self, fd: int, name: str) -> None:
        """Give a running QEMU `fd` under `name` (SCM_RIGHTS + `getfd`)."""
        self.qmp.send_fd(fd, name)

    def wait_event(
        self,
        name: NameFilter = None,
        match: Mapping[str, Any] | None = None,
        *,
        timeout: TimeoutArg = ...,
    ) -> Event:
        return self.qmp.wait_event(name, match, timeout=timeout)

    def events(self, *, timeout: TimeoutArg = ...) -> Iterator[Event]:
        return self.qmp.events(timeout=timeout)

    # -- ending -----------------------------------------------------------

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT, method: Method = "quit") -> None:
        """Graceful: ask QEMU (`quit`) or the guest (`powerdown`) and wait for
        the exit. Otherwise kill, clean up, and raise `AbnormalShutdown`."""
        _check_method(method)
        with self._op_lock:
            life = self._life
            if life.state in (State.NEW, State.FAILED):
                return
            if life.state is State.STOPPED:
                self._raise_unreported_crash()
                return
            life.state = State.SHUTTING_DOWN
            deadline = Deadline(timeout)
            cause: BaseException | None = None
            what = ""
            try:
                assert self._qmp is not None
                command = "quit" if method == "quit" else "system_powerdown"
                self._qmp.execute(command, timeout=deadline.remaining())
                if not self._exited.wait(deadline.remaining()):
                    what = f"QEMU did not exit within {timeout:g} s of {command!r}"
                    cause = Timeout(f"QEMU to exit after {command!r}", timeout)
            except (QMPError, Timeout) as exc:
                # QEMU may be exiting anyway (a `quit` sent earlier, a guest
                # poweroff racing ours): only a QEMU still there is a failure
                if not self._exited.wait(deadline.remaining()):
                    what = f"graceful shutdown ({method}) failed: {exc}"
                    cause = exc
            except BaseException:
                self._finish()
                raise
            self._finish()
            life.check_shutdown(method, what, cause)

    def wait(self, timeout: float | None = WAIT_TIMEOUT) -> int | None:
        """Wait for a VM expected to exit by itself (sends nothing); returns its
        exit code. Not gone in time → killed, then `AbnormalShutdown`."""
        with self._op_lock:
            life = self._life
            if life.state in (State.NEW, State.FAILED):
                return life.exit_code
            if life.state is not State.STOPPED:
                exited = self._exited.wait(Deadline(timeout).remaining())
                self._finish()
                if not exited:
                    raise life.abnormal(f"QEMU did not exit by itself within {timeout:g} s", None)
            self._raise_unreported_crash()
            return life.exit_code

    def kill(self) -> None:
        """Hard stop on purpose (SIGKILL); raises nothing."""
        with self._op_lock:
            if self._life.state in (State.NEW, State.FAILED, State.STOPPED):
                return
            self._life.state = State.SHUTTING_DOWN
            self._life.kill_process()
            self._finish()

    def _finish(self) -> None:
        life = self._life
        if not self._exited.wait(0):
            life.kill_process()
            self._exited.wait(10)
        life.reap(timeout=10)
        life.cleanup()
        if self._watcher is not None:
            self._watcher.join(10)

    def _raise_unreported_crash(self) -> None:
        err = self._life.crash_error()
        if err is not None:
            raise err

    def __enter__(self) -> Machine:
        if self._life.state is State.NEW:
            self.launch()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.kill()
        else:
            self.shutdown()


class AsyncMachine(_Common):
    """A QEMU VM driven from asyncio; the same contract as `Machine`."""

    def __init__(self, config: MachineConfig | None = None, **overrides: Any) -> None:
        self._life = Lifecycle(_config(config, overrides))
        self._qmp: AsyncQMPClient | None = None
        self._console: AsyncConsole | None = None
        self._agent: AsyncGuestAgent | None = None
        self._exited: asyncio.Event | None = None
        self._op_lock: asyncio.Lock | None = None

    async def launch(self, *, timeout: float | None = LAUNCH_TIMEOUT) -> AsyncMachine:
        """Start QEMU; return once QMP is negotiated, or raise `LaunchError`."""
        life = self._life
        loop = asyncio.get_running_loop()
        deadline = Deadline(timeout)
        self._exited = asyncio.Event()
        self._op_lock = asyncio.Lock()
        socks = life.start()
        if "serial" in socks:
            self._console = AsyncConsole(socks["serial"], life.console_path, self._vm_name())
            life.on_cleanup.append(self._console.close)
        if "agent" in socks:
            self._agent = AsyncGuestAgent(socks["agent"], f"guest agent of {self._vm_name()}")
            life.on_cleanup.append(self._agent.close)
        loop.add_reader(life.pidfd, self._on_exit)
        life.on_cleanup.append(lambda: self._stop_watching(loop))
        try:
            self._qmp = await AsyncQMPClient.connect(
                socks["qmp"], connect_timeout=deadline.remaining()
            )
        except Timeout as exc:
            raise life.launch_failed(f"no QMP greeting within {timeout:g} s", exc) from exc
        except (QMPError, OSError) as exc:
            await self._wait_exited(deadline.remaining())
            raise life.launch_failed(f"QMP failed ({exc})", exc) from exc
        except BaseException as exc:
            raise life.launch_failed(f"interrupted ({exc!r})", exc) from exc
        life.on_cleanup.insert(0, self._qmp.close)
        life.state = State.RUNNING
        return self

    def _stop_watching(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._life.pidfd >= 0:
            loop.remove_reader(self._life.pidfd)

    def _on_exit(self) -> None:
        life = self._life
        assert life.proc is not None and self._exited is not None
        asyncio.get_running_loop().remove_reader(life.pidfd)
        rc = life.proc.poll()  # the pidfd is readable: the child is a zombie now
        if rc is None:
            life.reap(timeout=1)
        else:
            life.record_exit(rc)
        self._exited.set()
        if life.state is State.RUNNING:  # nobody asked: it died or exited on its own
            life.cleanup()

    async def _wait_exited(self, timeout: float | None) -> bool:
        assert self._exited is not None
        if self._exited.is_set():
            return True
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    @property
    def console(self) -> AsyncConsole:
        """The serial console (needs `serial=True`)."""
        return _configured(self._console, "console", "serial")

    @property
    def agent(self) -> AsyncGuestAgent:
        return _configured(self._agent, "agent channel", "agent")

    async def wait_for_agent(self, timeout: float = 120.0) -> AsyncGuestAgent:
        await self.agent.sync(timeout=timeout)
        return self.agent

    @property
    def shell(self) -> AsyncShell:
        return AsyncShell(self.console)

    @property
    def qmp(self) -> AsyncQMPClient:
        return self._connected(self._qmp)

    async def execute(
        self, name: str, arguments: Mapping[str, Any] | None = None, *, timeout: TimeoutArg = ...
    ) -> Any:
        return await self.qmp.execute(name, arguments, timeout=timeout)

    async def add_fd(
        self, fd: int, fdset_id: int, opaque: str | None = None
    ) -> dict[str, Any] | None:
        """See `Machine.add_fd`."""
        if self._life.state is State.NEW:
            self._preset_fd(fd, fdset_id, opaque)
            return None
        return await self.qmp.add_fd(fd, fdset_id=fdset_id, opaque=opaque)

    async def send_fd(self, fd: int, name: str) -> None:
        """See `Machine.send_fd`."""
        await self.qmp.send_fd(fd, name)

    async def wait_event(
        self,
        name: NameFilter = None,
        match: Mapping[str, Any] | None = None,
        *,
        timeout: TimeoutArg = ...,
    ) -> Event:
        return await self.qmp.wait_event(name, match, timeout=timeout)

    def events(self, *, timeout: TimeoutArg = ...) -> Any:
        return self.qmp.events(timeout=timeout)

    async def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT, method: Method = "quit") -> None:
        """Graceful: see `Machine.shutdown`."""
        _check_method(method)
        life = self._life
        if life.state in (State.NEW, State.FAILED):
            return
        assert self._op_lock is not None
        async with self._op_lock:
            if life.state is State.STOPPED:
                self._raise_unreported_crash()
                return
            life.state = State.SHUTTING_DOWN
            deadline = Deadline(timeout)
            cause: BaseException | None = None
            what = ""
            try:
                assert self._qmp is not None
                command = "quit" if method == "quit" else "system_powerdown"
                await self._qmp.execute(command, timeout=deadline.remaining())
                if not await self._wait_exited(deadline.remaining()):
                    what = f"QEMU did not exit within {timeout:g} s of {command!r}"
                    cause = Timeout(f"QEMU to exit after {command!r}", timeout)
            except (QMPError, Timeout) as exc:
                # see Machine.shutdown: only a QEMU still there is a failure
                if not await self._wait_exited(deadline.remaining()):
                    what = f"graceful shutdown ({method}) failed: {exc}"
                    cause = exc
            except BaseException:
                await self._finish()
                raise
            await self._finish()
            life.check_shutdown(method, what, cause)

    async def wait(self, timeout: float | None = WAIT_TIMEOUT) -> int | None:
        """See `Machine.wait`."""
        life = self._life
        if life.state in (State.NEW, State.FAILED):
            return life.exit_code
        assert self._op_lock is not None
        async with self._op_lock:
            if life.state is not State.STOPPED:
                exited = await self._wait_exited(timeout)
                await self._finish()
                if not exited:
                    raise life.abnormal(f"QEMU did not exit by itself within {timeout:g} s", None)
            self._raise_unreported_crash()
            return life.exit_code

    async def kill(self) -> None:
        """Hard stop on purpose (SIGKILL); raises nothing."""
        life = self._life
        if life.state in (State.NEW, State.FAILED, State.STOPPED):
            return
        life.state = State.SHUTTING_DOWN
        life.kill_process()
        await self._finish()

    async def _finish(self) -> None:
        life = self._life
        if not await self._wait_exited(0):
            life.kill_process()
            await self._wait_exited(10)
        if life.returncode is None:
            life.reap(timeout=10)
        life.cleanup()

    def _raise_unreported_crash(self) -> None:
        err = self._life.crash_error()
        if err is not None:
            raise err

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


__all__ = ["AsyncMachine", "LaunchError", "Machine"]
