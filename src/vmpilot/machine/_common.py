"""What `Machine` and `AsyncMachine` share: construction, read-only views,
the defaults every public operation names, and the channel accessors' rules.
The operations themselves are plans (`_plans`); the faces supply primitives."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, TypeVar

from .._util.fds import check_fd
from ..errors import VMError
from ..qmp import AsyncQMPClient, QMPClient
from ..qmp.mux import QMPServer, serve
from .config import MachineConfig
from .lifecycle import Lifecycle, State

LAUNCH_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 30.0
WAIT_TIMEOUT = 300.0
COMMAND_TIMEOUT = 30.0  # one QMP command or event wait (the QMP clients' default too)
AGENT_TIMEOUT = 120.0  # qemu-ga starts late in boot


def make_config(config: MachineConfig | None, overrides: dict[str, Any]) -> MachineConfig:
    if config is None:
        return MachineConfig(**overrides)
    if overrides:
        return dataclasses.replace(config, **overrides)
    return config


_C = TypeVar("_C")


def configured(channel: _C | None, what: str, flag: str) -> _C:
    if channel is None:
        raise VMError(f"this VM has no {what}: configure it with {flag}=True")
    return channel


class Common:
    """Read-only views shared by both flavours."""

    _life: Lifecycle
    _qmp: QMPClient | AsyncQMPClient | None

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
    def shutdown_reason(self) -> str | None:
        """Why QEMU stopped, as it said: its `SHUTDOWN` event's reason
        (`guest-shutdown`, `host-qmp-quit`, `guest-reset`, ...), or `guest-panic`
        once `GUEST_PANICKED` came. None while it runs, or if it said nothing
        (killed). A panic, or a reset under `no_reboot`, makes `wait()` and
        `shutdown()` raise `GuestPanicked` / `GuestReset`."""
        return self._life.shutdown_reason

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

    def abandon(self) -> None:
        """Kill QEMU and run the post-shutdown step now, blocking, from any
        thread and without the face's event loop: for teardown code that can
        no longer call `kill()` (an AsyncMachine whose loop is gone). Raises
        nothing; a no-op once the VM is stopped."""
        self._life.cleanup()

    def serve_qmp(self, path: str | os.PathLike[str]) -> QMPServer:
        """Serve QMP to any number of clients at once on a new unix socket at
        `path`, through this Machine's own connection (see `vmpilot.qmp.mux`):
        `vmpilot events`, `vmpilot qmp`, qmp-shell and scripts can attach
        together. Returns the server (`.path`, `.close()`); it is closed with
        the VM's cleanup at the latest.

        A client's `quit` makes QEMU exit as asked (`qmp.closed_reason` is
        "QEMU quit"); to the shutdown contract that is QEMU ending by itself:
        `wait()` returns its exit code (0), `shutdown()` finds it stopped and
        returns without error."""
        qmp = self._qmp
        self._connected(qmp)  # raises VMError unless the VM is up
        assert qmp is not None
        server = serve(qmp, path)
        self._life.on_cleanup.append(server.close)
        return server

    def _preset_fd(self, fd: int, fdset_id: int, opaque: str | None) -> None:
        """Before launch: QEMU gets `fd` through `-add-fd` (fd set `fdset_id`)."""
        check_fd(fd)
        if isinstance(fdset_id, bool) or not isinstance(fdset_id, int) or fdset_id < 0:
            raise ValueError(f"fdset_id must be an int >= 0, not {fdset_id!r}")
        self._life.preset_fds.append((fd, fdset_id, opaque))

    def _configured_forward(self, guest_port: int) -> int:
        """The host port configured for `guest_port` (0: QEMU picks; ask it)."""
        for host, guest in self.config.forwards:
            if guest == guest_port:
                return host
        raise VMError(
            f"guest port {guest_port} is not forwarded: configure forwards=[(0, {guest_port})]"
        )

    @staticmethod
    def _usernet_port(guest_port: int, usernet: object) -> int:
        """The host port of the TCP forward to `guest_port` in HMP's `info usernet`."""
        row = re.compile(r"TCP\[HOST_FORWARD\]\s+\d+\s+\S+\s+(\d+)\s+\S+\s+(\d+)\b")
        for host, guest in row.findall(str(usernet)):
            if int(guest) == guest_port:
                return int(host)
        raise VMError(f"QEMU reports no forward to guest port {guest_port}: {usernet!r}")

    def _connected(self, client: _C | None) -> _C:
        if client is None or self._life.state in (State.NEW, State.FAILED):
            raise VMError(f"the VM is {self.state}: no QMP connection")
        return client

    def _vm_name(self) -> str:
        proc = self._life.proc
        return self.config.name or (f"QEMU pid {proc.pid}" if proc else "QEMU")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.config.name or ''} pid={self.pid} {self.state}>"
