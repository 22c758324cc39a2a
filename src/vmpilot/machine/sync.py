"""`Machine`: one VM driven from blocking code. Its operations are the plans
of `_plans`, run by `_util.plan.run` with the blocking primitives of `_SyncIO`."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any

from .._util.deadline import Deadline
from .._util.plan import run
from ..console import Console
from ..qga import GuestAgent
from ..qmp import Event, QMPClient
from ..qmp.events import NameFilter
from ..qtest import Qtest
from ..shell import Shell
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
from ._plans import DRAIN_TIMEOUT, FINISH_TIMEOUT, VERDICT_EVENTS, Method
from .config import MachineConfig
from .lifecycle import Lifecycle, State
from .storage import SyncStorage


class Machine(SyncStorage, Common):
    """A QEMU VM driven from blocking code.

    `Machine(config)` or `Machine(machine="none", memory=64, ...)`; then
    `launch()`, or `with Machine(...) as vm:` which launches and, on leaving,
    shuts down (or kills, if the block raised).
    """

    def __init__(self, config: MachineConfig | None = None, **overrides: Any) -> None:
        self._life = Lifecycle(make_config(config, overrides))
        self._qmp: QMPClient | None = None
        self._console: Console | None = None
        self._agent: GuestAgent | None = None
        self._qtest: Qtest | None = None
        self._exited = threading.Event()
        self._watcher: threading.Thread | None = None
        self._op_lock = threading.Lock()
        self._io = _SyncIO(self)

    def launch(self, *, timeout: float | None = LAUNCH_TIMEOUT) -> Machine:
        """Start QEMU; return once QMP is negotiated, or raise `LaunchError`."""
        with self._op_lock:
            run(_plans.launch(self._life, Deadline(timeout)), self._io)
        return self

    def _watch(self) -> None:
        """Notice QEMU's exit the moment it happens, whoever caused it."""
        life = self._life
        poller = select.poll()
        poller.register(life.pidfd, select.POLLIN)
        while not poller.poll(3_600_000):  # bounded by the VM's life; re-armed hourly
            pass
        life.reap(timeout=FINISH_TIMEOUT)
        self._exited.set()
        if life.claim(State.RUNNING, State.SHUTTING_DOWN):  # nobody asked: died or exited
            life.cleanup()

    # -- channels ---------------------------------------------------------

    @property
    def console(self) -> Console:
        """The serial console (needs `serial=True`); stays readable after the VM stops."""
        return configured(self._console, "console", "serial")

    @property
    def agent(self) -> GuestAgent:
        """The guest agent client (needs `agent=True` and qemu-ga in the guest)."""
        return configured(self._agent, "agent channel", "agent")

    @property
    def qtest(self) -> Qtest:
        """The qtest channel (needs `qtest=True`, usually with `accel="qtest"`)."""
        return configured(self._qtest, "qtest channel", "qtest")

    def wait_for_agent(self, *, timeout: float | None = AGENT_TIMEOUT) -> GuestAgent:
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
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = COMMAND_TIMEOUT,
    ) -> Any:
        """Run QMP command `name` on this VM; its `return` value, or `CommandError`."""
        return self.qmp.execute(name, arguments, timeout=timeout)

    def add_fd(
        self,
        fd: int,
        fdset_id: int,
        opaque: str | None = None,
        *,
        timeout: float | None = COMMAND_TIMEOUT,
    ) -> dict[str, Any] | None:
        """Put `fd` in fd set `fdset_id` (usable as `/dev/fdset/ID`): before
        launch through `-add-fd`, on a running VM through QMP `add-fd` (which
        returns QEMU's `{"fdset-id", "fd"}`)."""
        if self._life.state is State.NEW:
            self._preset_fd(fd, fdset_id, opaque)
            return None
        return self.qmp.add_fd(fd, fdset_id=fdset_id, opaque=opaque, timeout=timeout)

    def send_fd(self, fd: int, name: str, *, timeout: float | None = COMMAND_TIMEOUT) -> None:
        """Give a running QEMU `fd` under `name` (SCM_RIGHTS + `getfd`)."""
        self.qmp.send_fd(fd, name, timeout=timeout)

    def wait_event(
        self,
        name: NameFilter = None,
        match: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = COMMAND_TIMEOUT,
    ) -> Event:
        """The oldest event matching `name` and `match` (see `QMPClient.wait_event`)."""
        return self.qmp.wait_event(name, match, timeout=timeout)

    def events(self, *, timeout: float | None = COMMAND_TIMEOUT) -> Iterator[Event]:
        """Events as they arrive, each wait bounded by `timeout`."""
        return self.qmp.events(timeout=timeout)

    def forwarded_port(self, guest_port: int, *, timeout: float | None = COMMAND_TIMEOUT) -> int:
        """The host port (on 127.0.0.1) forwarded to `guest_port`: as
        configured, or, for a 0 in `forwards`, the one QEMU bound (asked of
        QEMU with HMP `info usernet`: the kernel chose it, so no race)."""
        host = self._configured_forward(guest_port)
        if host:
            return host
        usernet = self.execute(
            "human-monitor-command", {"command-line": "info usernet"}, timeout=timeout
        )
        return self._usernet_port(guest_port, usernet)

    # -- ending -----------------------------------------------------------

    def shutdown(
        self, method: Method = "quit", *, timeout: float | None = SHUTDOWN_TIMEOUT
    ) -> None:
        """Graceful: ask QEMU (`quit`) or the guest (`powerdown`) and wait for
        the exit. Otherwise kill, clean up, and raise `AbnormalShutdown`."""
        with self._op_lock:
            run(_plans.shutdown(self._life, method, Deadline(timeout)), self._io)

    def wait(self, *, timeout: float | None = WAIT_TIMEOUT) -> int | None:
        """Wait for a VM expected to exit by itself (sends nothing); returns its
        exit code. Not gone in time → killed, then `AbnormalShutdown`."""
        with self._op_lock:
            return run(_plans.wait(self._life, Deadline(timeout)), self._io)

    def kill(self) -> None:
        """Hard stop on purpose (SIGKILL); raises nothing."""
        with self._op_lock:
            run(_plans.kill(self._life), self._io)

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


class _SyncIO:
    """`Machine`'s blocking primitives for the plans (see `_plans`)."""

    def __init__(self, vm: Machine) -> None:
        self.vm = vm
        self.life = vm._life
        self.socks: dict[str, socket.socket] = {}

    def start(self) -> None:
        self.socks = self.life.start()

    def connect(self) -> None:
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
            vm._console = Console(socks["serial"], life.console_path, name)
            life.on_cleanup.append(vm._console.close)
        if "agent" in socks:
            vm._agent = GuestAgent(socks["agent"], f"guest agent of {name}")
            life.on_cleanup.append(vm._agent.close)
        if "qtest" in socks:
            vm._qtest = Qtest(socks["qtest"], f"qtest of {name}")
            life.on_cleanup.append(vm._qtest.close)
        vm._qmp = QMPClient(socks["qmp"], name=name)
        vm._qmp.add_listener(life.record_event, VERDICT_EVENTS)  # why QEMU stopped
        life.on_cleanup.insert(0, self._close_qmp)

    def _close_qmp(self) -> None:
        """The first cleanup step. QEMU gone: take what it sent last (a
        client's `quit` answered, SHUTDOWN) before closing, whoever won the
        race to clean up (the exit watcher may have)."""
        qmp = self.vm._qmp
        assert qmp is not None
        if self.life.returncode is not None:
            qmp._read_to_end(DRAIN_TIMEOUT)
        qmp.close()

    def read_greeting(self, deadline: Deadline) -> None:
        assert self.vm._qmp is not None
        self.vm._qmp.read_greeting(timeout=deadline.remaining())

    def negotiate(self, deadline: Deadline) -> None:
        assert self.vm._qmp is not None
        self.vm._qmp.negotiate(timeout=deadline.remaining())

    def running(self) -> None:
        life = self.life
        pid = life.proc.pid if life.proc else 0
        watcher = threading.Thread(target=self.vm._watch, name=f"vmpilot-watch-{pid}", daemon=True)
        self.vm._watcher = watcher
        watcher.start()

    def execute(self, command: str, deadline: Deadline) -> Any:
        assert self.vm._qmp is not None
        return self.vm._qmp.execute(command, timeout=deadline.remaining())

    def wait_exited(self, deadline: Deadline) -> bool:
        if self.vm._watcher is None:  # launching: nobody watches the pidfd yet
            return self.life.reap(timeout=deadline.remaining())
        return self.vm._exited.wait(deadline.remaining())

    def kill_process(self) -> None:
        self.life.kill_process()

    def cleanup(self) -> None:
        vm, life = self.vm, self.life
        life.reap(timeout=FINISH_TIMEOUT)
        if vm._watcher is not None:
            vm._watcher.join(FINISH_TIMEOUT)  # its cleanup (if it started one) is complete
        life.cleanup()
