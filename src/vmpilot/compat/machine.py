"""`QEMUMachine` with the API of QEMU's in-tree `qemu.machine` (7.2 to 10.x),
implemented on vmpilot: QEMU is spawned by vmpilot (own session, dies with its
controller), QMP is vmpilot's client on a socketpair, and a command in flight
when QEMU dies fails at once.

The protected hooks that test suites override or call keep their names and
roles: `_base_args`, `_pre_launch`, `_launch`, `_post_launch`,
`_early_cleanup`, `_soft_shutdown`, `_hard_shutdown`, `_do_shutdown`,
`_post_shutdown`, `_close_qemu_log_file`, `_load_io_log`, `_popen`, `_subp`,
`_qmp`, `_args`, `_qemu_full_args`, `_iolog`, `_events`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Sequence
from typing import Any, TypeVar

from .. import errors
from .._util.deadline import Deadline
from ..machine.config import options
from ..machine.process import QemuProcess
from ..machine.tempdirs import make_temp_dir
from .legacy import (
    ExecuteError,
    QEMUMonitorProtocol,
    QMPMessage,
    QMPReturnValue,
    QMPTimeoutError,
    SocketAddrT,
)

LOG = logging.getLogger("vmpilot.compat.machine")
_T = TypeVar("_T", bound="QEMUMachine")


class QEMUMachineError(errors.VMError):
    """An error in QEMUMachine."""


class QEMUMachineAddDeviceError(QEMUMachineError):
    """A device could not be added as asked."""


class VMLaunchFailure(QEMUMachineError, errors.LaunchError):
    """QEMU did not come up; `exitcode`, `command` and `output` say how."""

    def __init__(self, exitcode: int | None, command: str, output: str | None) -> None:
        errors.VMError.__init__(self, exitcode, command, output)
        self.exitcode = exitcode
        self.command = command
        self.output = output
        self.argv = command.split()
        self.exit_code = exitcode if exitcode is not None and exitcode >= 0 else None
        self.exit_signal = -exitcode if exitcode is not None and exitcode < 0 else None
        self.log = output or ""
        self.log_path = None

    def __str__(self) -> str:
        cause = self.__cause__
        text = f"{type(cause).__name__}: {cause}" if cause is not None and str(cause) else ""
        if cause is not None and not str(cause):
            text = type(cause).__name__
        text += "\n"
        if self.exitcode is not None:
            text += f"\tExit code: {self.exitcode}\n"
        return text + f"\tCommand: {self.command}\n\tOutput: {self.output}\n"


class AbnormalShutdown(QEMUMachineError, errors.AbnormalShutdown):
    """A graceful shutdown was requested but did not happen; QEMU was killed."""


def event_match(event: Any, match: Any) -> bool:
    """`match` is a sub-dict of `event`, recursively; a None value in `match`
    matches anything (so None itself cannot be matched)."""
    if match is None:
        return True
    if isinstance(match, dict):
        if not isinstance(event, dict):
            return False
        return all(key in event and event_match(event[key], want) for key, want in match.items())
    return bool(event == match)


class _ConsoleDrain:
    """Keeps QEMU's console socket drained (so QEMU never blocks on it) into
    a log file and a buffer, and hands the caller the other end of a
    socketpair that receives everything in order."""

    def __init__(self, qemu_end: socket.socket, log_path: str | None) -> None:
        self._qemu = qemu_end
        self.user, self._feed = socket.socketpair()
        self._log = open(log_path, "ab") if log_path else None  # noqa: SIM115
        self._thread = threading.Thread(target=self._run, name="vmpilot-console-drain", daemon=True)
        self._stop_r, self._stop_w = os.pipe()
        self._thread.start()

    def _run(self) -> None:
        pending = bytearray()  # from QEMU, not yet taken by the user
        self._feed.setblocking(False)
        qemu, feed = self._qemu.fileno(), self._feed.fileno()
        while True:
            writers = [feed] if pending else []
            readable, writable, _ = select.select([qemu, feed, self._stop_r], writers, [])
            if self._stop_r in readable:
                self._forward_typed()  # what the user sent before closing still goes
                return
            if qemu in readable:
                try:
                    data = self._qemu.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    return
                if self._log is not None:
                    self._log.write(data)
                    self._log.flush()
                pending += data
            if feed in readable:  # what the user types goes to QEMU
                self._forward_typed()
            if feed in writable:
                with contextlib.suppress(BlockingIOError):
                    del pending[: self._feed.send(pending)]

    def _forward_typed(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while typed := self._feed.recv(65536):
                self._qemu.sendall(typed)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(10)
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self._feed.close()
        self.user.close()
        self._qemu.close()
        if self._log is not None:
            self._log.close()


class QEMUMachine:
    """A QEMU VM with the in-tree library's API. As a context manager it shuts
    the VM down on exit (gracefully; on a failure, QEMU is killed and
    `AbnormalShutdown` raised)."""

    def __init__(
        self,
        binary: str,
        args: Sequence[str] = (),
        wrapper: Sequence[str] = (),
        name: str | None = None,
        base_temp_dir: str = "/var/tmp",
        monitor_address: SocketAddrT | None = None,
        sock_dir: str | None = None,
        drain_console: bool = False,
        console_log: str | None = None,
        log_dir: str | None = None,
        qmp_timer: float | None = 30,
    ) -> None:
        self._binary = binary
        self._args = list(args)
        self._wrapper = list(wrapper)
        self._name = name or f"qemu-{os.getpid()}-{id(self):x}"
        self._base_temp_dir = base_temp_dir
        self._monitor_address = monitor_address
        self._sock_dir = sock_dir  # accepted; the QMP and console sockets are socketpairs
        self._console_log_path = console_log
        self._drain_console = drain_console or console_log is not None
        self._log_dir = log_dir
        self._qmp_timer = qmp_timer

        self._temp_dir: str | None = None
        self._qmp_set = True
        self._qmp_connection: QEMUMonitorProtocol | None = None
        self._sock_pair: tuple[socket.socket, socket.socket] | None = None
        self._machine: str | None = None
        self._console_set = False
        self._console_index = 0
        self._console_device_type: str | None = None
        self._console_pair: tuple[socket.socket, socket.socket] | None = None
        self._console_socket: socket.socket | None = None
        self._console_drain: _ConsoleDrain | None = None
        self._console_file: socket.SocketIO | None = None
        self._console_address = f"{self._name}.con"  # kept for code that reads it
        self._user_fds: list[int] = []  # add_fd(): passed on every launch
        self._launch_fds: list[int] = []  # our socketpair ends, per launch
        self._process: QemuProcess | None = None  # vmpilot's owner of the QEMU process
        self._qemu_log_path: str | None = None
        self._qemu_log_file: int | None = None
        self._qemu_full_args: tuple[str, ...] = ()
        self._iolog: str | None = None
        self._events: list[QMPMessage] = []
        self._remove_files: list[str] = []
        self._launched = False
        self._user_killed = False
        self._quit_issued = False

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- configuration before launch -------------------------------------

    def add_args(self, *args: str) -> None:
        self._args.extend(args)

    @property
    def args(self) -> list[str]:
        return self._args

    @property
    def binary(self) -> str:
        """The QEMU binary (QEMU 9.0+)."""
        return self._binary

    def set_machine(self, machine_type: str) -> None:
        self._machine = machine_type

    def set_qmp_monitor(self, enabled: bool = True) -> None:
        self._qmp_set = enabled

    def add_monitor_null(self) -> None:
        self._args += ["-monitor", "null"]

    def set_console(self, device_type: str | None = None, console_index: int = 0) -> None:
        self._console_set = True
        self._console_device_type = device_type
        self._console_index = console_index

    def add_fd(self: _T, fd: int, fdset: int, opaque: str, opts: str = "") -> _T:
        """Pass `fd` to QEMU in fd set `fdset` (`-add-fd`)."""
        opt = options(None, fd=fd, set=fdset, opaque=opaque) + (f",{opts}" if opts else "")
        self._user_fds.append(fd)
        self._args += ["-add-fd", opt]
        return self

    # -- directories ------------------------------------------------------

    @property
    def temp_dir(self) -> str:
        if self._temp_dir is None:
            # vmpilot's naming: swept like Machine's if this controller dies uncleanly
            self._temp_dir = make_temp_dir("qemu-machine", self._base_temp_dir)
        return self._temp_dir

    @property
    def sock_dir(self) -> str:
        return self._sock_dir or self.temp_dir

    @property
    def log_dir(self) -> str:
        return self._log_dir or self.temp_dir

    # -- launching --------------------------------------------------------

    @property
    def _base_args(self) -> list[str]:
        args = ["-display", "none", "-vga", "none"]
        if self._qmp_set:
            if self._sock_pair is not None:
                chardev = options("socket", id="mon", fd=self._sock_pair[1].fileno())
            elif isinstance(self._monitor_address, tuple):
                host, port = self._monitor_address
                chardev = options("socket", id="mon", host=host, port=port)
            else:
                chardev = options("socket", id="mon", path=self._monitor_address)
            args += ["-chardev", chardev, "-mon", "chardev=mon,mode=control"]
        if self._machine is not None:
            args += ["-machine", self._machine]
        args += ["-serial", "null"] * self._console_index
        if self._console_set and self._console_pair is not None:
            args += ["-chardev", options("socket", id="console", fd=self._console_pair[1].fileno())]
            if self._console_device_type is None:
                args += ["-serial", "chardev:console"]
            else:
                args += ["-device", options(self._console_device_type, chardev="console")]
        return args

    def _pre_launch(self) -> None:
        if self._qmp_set:
            if self._monitor_address is None:
                self._sock_pair = socket.socketpair()
                self._launch_fds.append(self._sock_pair[1].fileno())
                self._qmp_connection = QEMUMonitorProtocol(self._sock_pair[0], nickname=self._name)
            else:
                if isinstance(self._monitor_address, str):
                    self._remove_files.append(self._monitor_address)
                self._qmp_connection = QEMUMonitorProtocol(
                    self._monitor_address, server=True, nickname=self._name
                )
        if self._console_set:
            self._console_pair = socket.socketpair()
            self._launch_fds.append(self._console_pair[1].fileno())
        self._qemu_log_path = os.path.join(self.log_dir, self._name + ".log")
        self._qemu_log_file = os.open(
            self._qemu_log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644
        )
        self._iolog = None
        self._qemu_full_args = (*self._wrapper, self._binary, *self._base_args, *self._args)

    def _launch(self) -> None:
        self._pre_launch()
        LOG.debug("VM launch command: %r", " ".join(self._qemu_full_args))
        assert self._qemu_log_file is not None
        fds = self._user_fds + self._launch_fds
        for fd in fds:
            os.set_inheritable(fd, True)
        self._process = QemuProcess(
            self._qemu_full_args, fds, self._qemu_log_file, inherit=True,
            crash_note=lambda: f'; command: "{" ".join(self._qemu_full_args)}"',
        )  # fmt: skip
        self._launched = True
        self._post_launch()

    def _post_launch(self) -> None:
        if self._sock_pair is not None:
            self._sock_pair[1].close()
        if self._console_pair is not None:
            self._console_pair[1].close()
        if self._qmp_connection is not None:
            if self._monitor_address is None:
                self._qmp_connection.connect_timeout = self._qmp_timer
                self._qmp_connection.connect()
            else:
                self._qmp_connection.accept(self._qmp_timer)

    def launch(self) -> None:
        """Start QEMU and connect QMP; on failure clean up and raise
        `VMLaunchFailure` (exit code, command line, QEMU's output)."""
        if self._launched:
            raise QEMUMachineError("VM already launched")
        try:
            self._launch()
        except BaseException as exc:
            if self._launched:
                self._reap_after_failed_launch()
            else:
                self._post_shutdown()
            if isinstance(exc, Exception):
                raise VMLaunchFailure(
                    self.exitcode(), " ".join(self._qemu_full_args), self._iolog
                ) from exc
            raise

    def _reap_after_failed_launch(self) -> None:
        # QEMU most often exits by itself on a bad option; else it is killed
        if self._process is not None and not self._process.reap(self._qmp_timer or 30):
            self._user_killed = True
            self._process.kill()
            self._process.reap(30)
        self._post_shutdown()

    # -- state ------------------------------------------------------------

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def _popen(self) -> subprocess.Popen[bytes] | None:
        """The Popen of QEMU (in-tree's attribute; owned by vmpilot's QemuProcess)."""
        return self._process.proc if self._process is not None else None

    @property
    def _subp(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise QEMUMachineError("Subprocess pipe not present")
        return self._process.proc

    def exitcode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def get_pid(self) -> int | None:
        return self._subp.pid if self.is_running() else None

    def get_log(self) -> str | None:
        """QEMU's output, after shutdown or a failed launch."""
        return self._iolog

    def _load_io_log(self) -> None:
        if self._qemu_log_path is not None:
            try:
                with open(self._qemu_log_path, errors="replace") as f:
                    self._iolog = f.read()
            except OSError:
                self._iolog = None

    def _close_qemu_log_file(self) -> None:
        if self._qemu_log_file is not None:
            os.close(self._qemu_log_file)
            self._qemu_log_file = None

    # -- QMP --------------------------------------------------------------

    @property
    def _qmp(self) -> QEMUMonitorProtocol:
        if self._qmp_connection is None:
            raise QEMUMachineError("Attempt to access QMP with no connection")
        return self._qmp_connection

    @classmethod
    def _qmp_args(cls, conv_keys: bool, args: dict[str, Any]) -> dict[str, object]:
        return {k.replace("_", "-"): v for k, v in args.items()} if conv_keys else args

    @classmethod
    def _call_args(
        cls, args_dict: dict[str, object] | None, conv_keys: bool | None, args: dict[str, Any]
    ) -> dict[str, object]:
        """The arguments of `qmp()`/`cmd()`: a dict goes as given, keyword
        arguments get `_` turned into `-` unless `conv_keys` is False."""
        if args_dict is not None:
            if args or conv_keys is not None:
                raise ValueError("give args_dict or keyword arguments, not both")
            return args_dict
        return cls._qmp_args(conv_keys is not False, args)

    def qmp(
        self,
        cmd: str,
        args_dict: dict[str, object] | None = None,
        conv_keys: bool | None = None,
        **args: Any,
    ) -> QMPMessage:
        """Run `cmd`; the whole response message (errors are not raised)."""
        response = self._qmp.cmd_raw(cmd, self._call_args(args_dict, conv_keys, args))
        if cmd == "quit" and "return" in response:
            self._quit_issued = True
        return response

    def cmd(
        self,
        cmd: str,
        args_dict: dict[str, object] | None = None,
        conv_keys: bool | None = None,
        **args: Any,
    ) -> QMPReturnValue:
        """Run `cmd`; its return value, or raise `ExecuteError`. QEMU 8.2+'s
        signature: the arguments as a dict (`vm.cmd("blockdev-add", {...})`,
        sent as given) or as keyword arguments (`_` becomes `-`)."""
        if isinstance(args_dict, bool):  # cmd(name, False): an old-era conv_keys
            args_dict, conv_keys = None, args_dict
        return self._run_command(cmd, self._call_args(args_dict, conv_keys, args))

    def command(self, cmd: str, conv_keys: bool = True, **args: Any) -> QMPReturnValue:
        """`cmd` before QEMU 8.2: keyword arguments only, the second positional
        parameter is `conv_keys`."""
        return self._run_command(cmd, self._qmp_args(conv_keys, args))

    def _run_command(self, cmd: str, arguments: dict[str, object]) -> QMPReturnValue:
        result = self._qmp.command(cmd, **arguments)
        if cmd == "quit":
            self._quit_issued = True
        return result

    def hmp(self, command_line: str) -> QMPMessage:
        """Run an HMP command line; the response message (`return` is its output)."""
        return self.qmp("human-monitor-command", {"command-line": command_line})

    def send_fd_scm(self, fd: int | None = None, file_path: str | None = None) -> int:
        """Send an fd (or a file opened read-only) via SCM_RIGHTS; the next
        `getfd`/`add-fd` takes it."""
        if (fd is None) == (file_path is None):
            raise ValueError("send_fd_scm(): give exactly one of fd and file_path")
        if file_path is not None:
            with open(file_path, "rb") as f:
                self._qmp.send_fd_scm(f.fileno())
        else:
            assert fd is not None
            self._qmp.send_fd_scm(fd)
        return 0

    # -- events -----------------------------------------------------------

    event_match = staticmethod(event_match)

    def get_qmp_event(self, wait: bool | float = False) -> QMPMessage | None:
        if self._events:
            return self._events.pop(0)
        return self._qmp.pull_event(wait=wait)

    def get_qmp_events(self, wait: bool | float = False) -> list[QMPMessage]:
        events = self._qmp.get_events(wait=wait)
        events.extend(self._events)
        self._events.clear()
        return events

    def clear_events(self) -> None:
        self._events.clear()
        self._qmp.clear_events()

    def event_wait(
        self, name: str, timeout: float = 60.0, match: QMPMessage | None = None
    ) -> QMPMessage | None:
        """Wait for event `name` (whose message matches `match`, see
        `event_match`); a timeout raises (None only with timeout 0)."""
        return self.events_wait([(name, match)], timeout)

    def events_wait(
        self, events: Sequence[tuple[str, Any]], timeout: float = 60.0
    ) -> QMPMessage | None:
        def wanted(event: QMPMessage) -> bool:
            return any(event["event"] == n and event_match(event, m) for n, m in events)

        for event in self._events:
            if wanted(event):
                self._events.remove(event)
                return event
        deadline = Deadline(timeout)
        while True:
            wait: bool | float = (deadline.remaining() or 0.0) if timeout else False
            if timeout and wait == 0:
                raise QMPTimeoutError(f"one of events {[n for n, _ in events]}", timeout)
            new = self._qmp.pull_event(wait=wait)
            if new is None:
                return None
            if wanted(new):
                return new
            self._events.append(new)

    # -- console ----------------------------------------------------------

    @property
    def console_socket(self) -> socket.socket:
        """A socket connected to the console (set_console() first). With
        drain_console/console_log, QEMU's output is drained continuously."""
        if self._console_socket is None:
            if self._console_pair is None:
                raise QEMUMachineError("no console: call set_console() before launch()")
            ours = self._console_pair[0]
            if self._drain_console:
                self._console_drain = _ConsoleDrain(ours, self._console_log_path)
                self._console_socket = self._console_drain.user
            else:
                self._console_socket = ours
        return self._console_socket

    @property
    def console_file(self) -> socket.SocketIO:
        """The console socket as an unbuffered binary file (QEMU 9.0+)."""
        if self._console_file is None:
            self._console_file = self.console_socket.makefile(mode="rb", buffering=0)
        assert self._console_file is not None
        return self._console_file

    # -- ending -----------------------------------------------------------

    def _kill_group(self) -> None:
        if self._process is not None:
            self._process.kill()

    def _early_cleanup(self) -> None:
        """Before waiting for QEMU: an undrained console is closed, so QEMU
        cannot block writing to it while we wait. A drained one keeps being
        drained until QEMU is gone (input in flight still reaches the guest)."""
        if self._console_drain is None and self._console_socket is not None:
            self._console_socket.close()
            self._console_socket = None

    def _close_console(self) -> None:
        if self._console_file is not None:
            self._console_file.close()
            self._console_file = None
        if self._console_drain is not None:
            self._console_drain.close()
            self._console_drain = None
        elif self._console_socket is not None:
            self._console_socket.close()
        self._console_socket = None

    def _hard_shutdown(self) -> None:
        self._early_cleanup()
        self._kill_group()
        if self._process is not None:
            self._process.wait(60)

    def _close_qmp_connection(self) -> None:
        if self._qmp_connection is None:
            return
        try:
            self._qmp_connection.close()
        finally:
            self._qmp_connection = None

    def _soft_shutdown(self, timeout: float | None) -> None:
        self._early_cleanup()
        if self._qmp_connection is not None:
            try:
                if not self._quit_issued:
                    # bounded: a stopped or wedged QEMU must not hang the shutdown
                    self._qmp_connection.settimeout(timeout)
                    self.qmp("quit")
            finally:
                self._close_qmp_connection()
        elif not self._quit_issued and self._process is not None:
            self._process.kill(signal.SIGTERM)
        if self._process is not None:
            self._process.wait(timeout)

    def _do_shutdown(self, timeout: float | None) -> None:
        try:
            self._soft_shutdown(timeout)
        except Exception as exc:
            LOG.debug("graceful shutdown failed (%s); killing QEMU", exc)
            self._hard_shutdown()
            raise AbnormalShutdown(
                f"Could not perform graceful shutdown: {type(exc).__name__}: {exc}"
            ) from exc

    def shutdown(self, hard: bool = False, timeout: float | None = 30) -> None:
        """Stop the VM (gracefully unless `hard`) and clean up; nothing if it
        is not launched."""
        if not self._launched:
            return
        try:
            if hard:
                self._user_killed = True
                self._hard_shutdown()
            else:
                self._do_shutdown(timeout)
        finally:
            self._post_shutdown()

    def kill(self) -> None:
        self.shutdown(hard=True)

    def wait(self, timeout: float | None = 30) -> None:
        """Wait for a VM that exits by itself, then clean up (killed, and
        `AbnormalShutdown`, if it does not exit in time)."""
        self._quit_issued = True
        self.shutdown(timeout=timeout)

    def _post_shutdown(self) -> None:
        """Clean up after QEMU exited (or a launch failed): runs on every path."""
        if self._process is not None:
            # kills a QEMU still there (nothing outlives the post-shutdown step), closes the pidfd;
            # a crash (a signal vmpilot did not send) was logged when it was recorded
            self._process.close()
        try:
            self._close_qmp_connection()
        except Exception as exc:
            LOG.warning("closing QMP failed: %s", exc)
        self._close_console()
        for pair in (self._sock_pair, self._console_pair):
            if pair is not None:
                for s in pair:
                    s.close()
        self._sock_pair = self._console_pair = None
        self._launch_fds.clear()
        self._close_qemu_log_file()
        self._load_io_log()
        self._qemu_log_path = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
        while self._remove_files:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._remove_files.pop())
        self._quit_issued = False
        self._user_killed = False
        self._launched = False


__all__ = [
    "AbnormalShutdown",
    "ExecuteError",
    "QEMUMachine",
    "QEMUMachineAddDeviceError",
    "QEMUMachineError",
    "VMLaunchFailure",
]
