"""The lifecycle both Machine flavours share: the state table, the private
temp dir, wiring the channels into the command line (`argv.build_argv`),
handing QEMU to its one owner (`process.QemuProcess`), and the post-shutdown
step that runs exactly once whatever happened. Nothing here waits: the
operations that wait are plans (`_plans.py`) run by the two faces."""

from __future__ import annotations

import enum
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable

from ..console.core import panic_line, visible
from ..errors import AbnormalShutdown, GuestPanicked, GuestReset, LaunchError
from ..qmp import Event
from . import process, virtiofs
from .argv import Wiring, build_argv
from .config import ConfigError, MachineConfig
from .tempdirs import make_temp_dir
from .tempdirs import sweep_stale_dirs as sweep_stale_dirs  # its old home

log = logging.getLogger("vmpilot.machine")

LOG_KEEP = 1024 * 1024  # bytes of QEMU's output kept after the temp dir is gone
TAIL = 4000
CRASH_NOTE_TAIL = 1000


def _summary(argv: list[str], head: int = 12) -> str:
    """The command line, shortened for an INFO line (DEBUG has all of it);
    never cut between an option and its value."""
    if head < len(argv) and argv[head - 1].startswith("-"):
        head += 1
    shown = [os.path.basename(argv[0]), *argv[1:head]]
    more = len(argv) - head
    return " ".join(shown) + (f" ... (+{more} args)" if more > 0 else "")


class State(enum.Enum):
    NEW = "new"
    LAUNCHING = "launching"
    RUNNING = "running"
    SHUTTING_DOWN = "shutting_down"  # someone (a call, or the exit watcher) is ending it
    STOPPED = "stopped"
    FAILED = "failed"  # launch failed


# every legal move; anything else is a bug and raises IllegalTransition
TRANSITIONS: dict[State, frozenset[State]] = {
    State.NEW: frozenset({State.LAUNCHING}),
    State.LAUNCHING: frozenset({State.RUNNING, State.FAILED}),
    State.RUNNING: frozenset({State.SHUTTING_DOWN}),
    State.SHUTTING_DOWN: frozenset({State.STOPPED}),
    State.STOPPED: frozenset(),
    State.FAILED: frozenset(),
}

# socketpair name -> the MachineConfig flag that asks for it
_CHANNELS = {"serial": "serial", "qtest": "qtest", "agent": "agent"}


class IllegalTransition(LaunchError, RuntimeError):
    """A lifecycle move the state table does not allow (a Machine is launched once)."""


class Lifecycle:
    """One VM's life. Thread-safe: the exit watcher and the caller may race."""

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self._state = State.NEW
        self.argv: list[str] = []
        self.accel = ""
        self.accel_reason = ""
        self.temp_dir: str | None = None
        self.log_path: str | None = None
        self.console_path: str | None = None
        self.qmp_path: str | None = None
        self.preset_fds: list[tuple[int, int, str | None]] = []  # -add-fd before launch
        self.kept_log_dir: str | None = None
        self.process: process.QemuProcess | None = None  # the owner of QEMU the process
        self.virtiofsds: list[virtiofs.Virtiofsd] = []  # reaped by cleanup, after QEMU
        self.crash_reported = False
        self.shutdown_reason: str | None = None  # QEMU's SHUTDOWN reason; "guest-panic" sticks
        self.guest_panicked = False  # GUEST_PANICKED came
        self.verdict_reported = False
        self._log_text: str | None = None
        self._console_text: str | None = None
        self._lock = threading.RLock()
        self._cleaned = False
        self.on_cleanup: list[Callable[[], None]] = []
        self._signals_logged: set[int] = set()

    # -- the state machine (no waiting here) ------------------------------

    @property
    def state(self) -> State:
        return self._state

    def move(self, to: State) -> None:
        """Go to `to`, or raise `IllegalTransition` if the table forbids it."""
        with self._lock:
            if to not in TRANSITIONS[self._state]:
                if to is State.LAUNCHING:
                    raise IllegalTransition(
                        f"a Machine is launched once; this one is {self._state.value}"
                    )
                raise IllegalTransition(f"no move from {self._state.value} to {to.value}")
            self._state = to

    def claim(self, frm: State, to: State) -> bool:
        """Move `frm` → `to` only if the state is `frm` now (atomically); so
        of a caller and the exit watcher racing to end the VM, one wins."""
        with self._lock:
            if self._state is not frm:
                return False
            self.move(to)
            return True

    @property
    def label(self) -> str:
        """The VM's name for log lines: its configured name, else QEMU's pid."""
        name = self.config.name
        pid = self.process.pid if self.process is not None else None
        if name:
            return f"{name} (pid {pid})" if pid else name
        return f"QEMU pid {pid}" if pid else "QEMU"

    # -- launching --------------------------------------------------------

    def start(self) -> dict[str, socket.socket]:
        """Validate, make the temp dir, spawn QEMU; returns our ends of the
        socketpairs: "qmp", and "serial" / "qtest" / "agent" when configured.
        On failure everything made so far is undone."""
        self.move(State.LAUNCHING)
        cfg = self.config
        try:
            qemu = cfg.resolve_qemu()
            self.accel, self.accel_reason = cfg.resolve_accel()
            cfg.validate()
            if cfg.log_dir is not None and not os.path.isdir(cfg.log_dir):
                raise ConfigError(f"log_dir {cfg.log_dir!r} is not a directory")
        except LaunchError:
            self.move(State.FAILED)
            raise
        log.info("%s: accel %s (%s)", self.label, self.accel, self.accel_reason)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", cfg.name or "")[:40]
        self.temp_dir = make_temp_dir(safe)  # 0700, swept if we die without cleaning up
        logs = tempfile.mkdtemp(prefix=f"{safe or 'vm'}-", dir=cfg.log_dir) if cfg.log_dir else None
        self.kept_log_dir = logs
        self.log_path = os.path.join(logs or self.temp_dir, "qemu.log")
        pairs: dict[str, tuple[socket.socket, socket.socket]] = {}
        log_fd = -1
        try:
            wanted = ["qmp"] + [name for name in _CHANNELS if getattr(cfg, _CHANNELS[name])]
            for name in wanted:
                pairs[name] = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            if cfg.expose_qmp:
                self.qmp_path = os.path.join(self.temp_dir, "qmp.sock")
            if cfg.serial:
                self.console_path = os.path.join(logs or self.temp_dir, "console.log")
            theirs = {name: pair[1].fileno() for name, pair in pairs.items()}
            if cfg.shares:
                self.virtiofsds = virtiofs.start_all(cfg.shares, self.temp_dir)
            wiring = Wiring(
                qmp_fd=theirs["qmp"],
                qmp_path=self.qmp_path,
                serial_fd=theirs.get("serial"),
                qtest_fd=theirs.get("qtest"),
                agent_fd=theirs.get("agent"),
                preset_fds=tuple(self.preset_fds),
                virtiofs_fds=tuple(d.qemu_fd for d in self.virtiofsds),
            )
            argv = self.argv = build_argv(cfg, self.accel, wiring, qemu)
            log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                self.process = process.QemuProcess(
                    argv, wiring.fds, log_fd, crash_note=self._crash_note
                )
            except OSError as exc:
                raise LaunchError(f"cannot start QEMU: {exc}", argv=argv) from exc
            log.info("%s: launched: %s", self.label, _summary(argv))
            log.debug("%s: argv: %s", self.label, " ".join(argv))
        except BaseException:
            for ours, _ in pairs.values():
                ours.close()
            self.move(State.FAILED)
            self.cleanup()
            raise
        finally:
            for _, far in pairs.values():
                far.close()
            for daemon in self.virtiofsds:
                daemon.release_qemu_end()  # QEMU has its copy
            if log_fd >= 0:
                os.close(log_fd)
        return {name: ours for name, (ours, _) in pairs.items()}

    def launch_failed(self, why: str, cause: BaseException | None) -> LaunchError:
        """Kill what is left, clean up, and describe the failure."""
        self.kill_process()
        self.reap(timeout=10)
        self.claim(State.LAUNCHING, State.FAILED)
        self.cleanup()
        rc = self.returncode
        return LaunchError(
            f"QEMU did not come up: {why} ({process.describe_status(rc)})",
            argv=self.argv,
            exit_code=rc if rc is not None and rc >= 0 else None,
            exit_signal=-rc if rc is not None and rc < 0 else None,
            log=self.log + self.daemon_logs(),
        )

    def daemon_logs(self) -> str:
        """What the virtiofsds said (a share's failure shows there, not in QEMU's log)."""
        return "".join(
            f"\nvirtiofsd for share {i}:\n{d.log.rstrip()}"
            for i, d in enumerate(self.virtiofsds)
            if d.log.strip()
        )

    # -- ending -----------------------------------------------------------

    # -- the process (owned by process.QemuProcess; these delegate) --------

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.process.proc if self.process is not None else None

    @property
    def pidfd(self) -> int:
        return self.process.pidfd if self.process is not None else -1

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process is not None else None

    @property
    def crashed(self) -> bool:
        """QEMU died by a signal vmpilot did not send."""
        return self.process is not None and self.process.crashed

    def kill_process(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None:
            if self.process.returncode is None and sig not in self._signals_logged:
                self._signals_logged.add(sig)
                log.info("%s: killing QEMU (%s)", self.label, signal.Signals(sig).name)
            self.process.kill(sig)

    def reap(self, timeout: float | None) -> bool:
        """Wait (bounded) for QEMU to exit and record how; True if it has."""
        return self.process is None or self.process.reap(timeout)

    def record_exit(self, rc: int) -> None:
        if self.process is not None:
            self.process.record_exit(rc)

    def _crash_note(self) -> str:
        """For the crash warning: what QEMU said last, and the log's path only
        where it is kept (the temp dir, and the log in it, go at cleanup)."""
        tail = self.log.rstrip()[-CRASH_NOTE_TAIL:]
        note = f"; QEMU's log (tail):\n{tail}" if tail else ""
        if self.kept_log_dir is not None and self.log_path is not None:
            note += f"\nlog: {self.log_path}"
        return note

    def cleanup(self) -> None:
        """The post-shutdown step: runs once, whatever path got us here."""
        with self._lock:
            if self._cleaned:
                return
            self._cleaned = True
        for fn in self.on_cleanup:
            try:
                fn()
            except Exception:
                log.exception("cleanup step %r failed", fn)
        if self.process is not None:
            self.process.close()  # kills and reaps a QEMU still there
            status = process.describe_status(self.process.returncode)
            log.info("%s: QEMU ended (%s); cleaning up", self.label, status)
        for daemon in self.virtiofsds:  # they exit once QEMU's end is closed
            daemon.close()
        self._log_text = self._read_log(self.log_path)
        self._console_text = self._read_log(self.console_path)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None
        with self._lock:
            if self._state is State.RUNNING:
                self.move(State.SHUTTING_DOWN)
            if self._state is State.SHUTTING_DOWN:
                self.move(State.STOPPED)

    @staticmethod
    def _read_log(path: str | None) -> str:
        if path is None:
            return ""
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - LOG_KEEP))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    @property
    def log(self) -> str:
        """What QEMU printed (stdout and stderr); kept after cleanup."""
        return self._log_text if self._log_text is not None else self._read_log(self.log_path)

    @property
    def console_log(self) -> str:
        """The serial console transcript (tail); kept after cleanup."""
        if self._console_text is not None:
            return self._console_text
        return self._read_log(self.console_path)

    # -- the verdict on the guest ------------------------------------------

    def record_event(self, event: Event) -> None:
        """Note why QEMU stops (a QMP listener of both faces calls this)."""
        with self._lock:
            if event.name == "GUEST_PANICKED":
                self.guest_panicked = True
                self.shutdown_reason = "guest-panic"
            elif event.name == "SHUTDOWN" and self.shutdown_reason != "guest-panic":
                self.shutdown_reason = str(event.data.get("reason", "")) or None

    def guest_error(self) -> AbnormalShutdown | None:
        """`GuestPanicked` for a panicked guest, `GuestReset` for a reset under
        `no_reboot` (QEMU exited instead): once, like a crash. A panic is what
        QEMU reported (pvpanic) or what the console showed: a `shutdown()` may
        overtake pvpanic, a guest without it resets (`panic=-1`) or hangs."""
        console = self.console_log
        panic = panic_line(console)
        with self._lock:
            reason = self.shutdown_reason
            reset = reason == "guest-reset" and self.config.no_reboot
            if self.verdict_reported or not (reason == "guest-panic" or reset or panic):
                return None
            self.verdict_reported = True
        how = "GUEST_PANICKED" if self.guest_panicked else f"SHUTDOWN reason {reason}"
        tail = visible(console[-TAIL:]).rstrip()
        shown = f"\nconsole (tail):\n{tail}" if tail else ""
        if reason == "guest-panic" or panic:
            return GuestPanicked(
                f"the guest kernel panicked: {panic or '(no panic text on the console)'}"
                f" (QEMU: {how}){shown}",
                panic=panic, console_tail=tail, reason=reason or "",
            )  # fmt: skip
        return GuestReset(f"the guest reset itself under no_reboot (QEMU: {how}){shown}")

    def verdict(self) -> AbnormalShutdown | None:
        """What went wrong that nobody was told about yet: QEMU crashed, or the guest."""
        return self.crash_error() or self.guest_error()

    def abnormal(self, what: str, cause: BaseException | None) -> AbnormalShutdown:
        tail = self.log.rstrip()[-TAIL:]
        text = f"{what}; QEMU was killed ({process.describe_status(self.returncode)})"
        if tail:
            text += f"\nQEMU's log (tail):\n{tail}"
        exc = AbnormalShutdown(text)
        exc.__cause__ = cause
        return exc

    def check_shutdown(self, method: str, what: str, cause: BaseException | None) -> None:
        """The verdict on a finished graceful shutdown: raise unless QEMU
        exited with status 0 without being killed."""
        if cause is not None:
            raise self.abnormal(what, cause)
        err = self.verdict()
        if err is not None:
            raise err
        if self.exit_code not in (None, 0):
            tail = self.log.rstrip()[-TAIL:]
            raise AbnormalShutdown(
                f"QEMU exited with status {self.exit_code} on {method}"
                + (f"\nQEMU's log (tail):\n{tail}" if tail else "")
            )

    def crash_error(self) -> AbnormalShutdown | None:
        """An error for a crash nobody was told about yet (then never again)."""
        with self._lock:
            if not self.crashed or self.crash_reported:
                return None
            self.crash_reported = True
        tail = self.log.rstrip()[-TAIL:]
        text = f"QEMU crashed ({process.describe_status(self.returncode)})"
        return AbnormalShutdown(text + (f"\nQEMU's log (tail):\n{tail}" if tail else ""))

    @property
    def exit_code(self) -> int | None:
        return self.process.exit_code if self.process is not None else None

    @property
    def exit_signal(self) -> int | None:
        return self.process.exit_signal if self.process is not None else None
