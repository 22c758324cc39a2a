"""One exception tree for the whole library (see DESIGN.md, "Errors").

Every message says what was asked, what happened, and where to look, so that a
failing test's traceback is enough to understand what QEMU did.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _clip(data: bytes, limit: int = 200) -> bytes:
    return data if len(data) <= limit else data[:limit] + b"...(%d bytes)" % len(data)


class VMError(Exception):
    """Base of every error vmpilot raises on purpose."""


class LaunchError(VMError):
    """QEMU did not come up: carries the argv, how it ended and what it printed."""

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        exit_code: int | None = None,
        exit_signal: int | None = None,
        log: str = "",
        log_path: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.exit_code = exit_code
        self.exit_signal = exit_signal
        self.log = log
        self.log_path = log_path
        parts = [message]
        if self.argv:
            parts.append("argv: " + " ".join(self.argv))
        if log.strip():
            parts.append("QEMU said:\n" + log.rstrip()[-4000:])
        if log_path:
            parts.append(f"log: {log_path}")
        super().__init__("\n".join(parts))


class ConfigError(LaunchError, ValueError):
    """The VM description is invalid; QEMU was not started."""


class QMPError(VMError):
    """Anything that went wrong talking QMP."""


class ValidationError(QMPError, ValueError):
    """A command does not fit the schema of the connected QEMU; not sent."""


class ProtocolError(QMPError):
    """The peer broke the protocol; `data` holds the offending bytes (clipped)."""

    def __init__(self, message: str, data: bytes = b"") -> None:
        self.data = _clip(data)
        self.items: list[Any] = []  # complete items parsed before the violation
        super().__init__(f"{message}: {self.data!r}" if data else message)


class CommandError(QMPError):
    """QEMU answered a command with an error reply."""

    def __init__(
        self, command: str, arguments: dict[str, Any] | None, error_class: str, desc: str
    ) -> None:
        self.command = command
        self.arguments = arguments
        self.error_class = error_class
        self.desc = desc
        args = f" {arguments!r}" if arguments else ""
        super().__init__(f"{command}{args} failed: {error_class}: {desc}")


class ChannelClosed(VMError):
    """A channel to QEMU (QMP, console, guest agent, qtest) is closed: QEMU
    exited, or vmpilot closed it. One base, so `except ChannelClosed` covers
    every channel; each subclass also keeps its channel's own base."""


class Disconnected(QMPError, ChannelClosed):
    """The QMP connection is gone (or was never there); nothing more can be sent."""


class Timeout(VMError, TimeoutError):
    """A wait ran out of time; the message says what was awaited and for how long."""

    def __init__(self, what: str, timeout: float | None) -> None:
        self.what = what
        self.timeout = timeout
        after = f"after {timeout:g} s " if timeout is not None else ""
        super().__init__(f"timed out {after}waiting for {what}")


class AbnormalShutdown(VMError):
    """A graceful shutdown (or an expected exit) did not happen; the VM was killed."""


class GuestError(VMError):
    """The guest (console, agent) did not behave as expected."""


class GuestPanicked(AbnormalShutdown, GuestError):
    """The guest kernel panicked: never a success. `panic` is the kernel's
    panic line (when the console saw it), `console_tail` the console's last
    output (control characters escaped), `reason` why QEMU stopped (its
    `SHUTDOWN` reason, or `guest-panic` for `GUEST_PANICKED`; "" while running)."""

    def __init__(self, message: str, *, panic: str = "", console_tail: str = "", reason: str = ""):
        super().__init__(message)
        self.panic = panic
        self.console_tail = console_tail
        self.reason = reason


class GuestReset(AbnormalShutdown):
    """The guest reset itself under `no_reboot` (QEMU exited instead), with no
    panic seen: a triple fault or a `reboot` where an exit was expected."""


class PackageError(GuestError):
    """A Debian package (for the bundled guest) could not be resolved, fetched or read."""


# -- the serial console -------------------------------------------------------


class ConsoleClosed(GuestError, ChannelClosed):
    """The console closed (the VM died or was shut down, or it was closed)."""


class ExpectTimeout(Timeout, GuestError):
    """The pattern did not show up on the console in time."""

    def __init__(self, message: str, what: str, timeout: float | None) -> None:
        Timeout.__init__(self, what, timeout)
        self.args = (message,)


# -- the guest agent ----------------------------------------------------------


class AgentError(GuestError):
    """The agent answered with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"guest agent: {command} failed: {error_class}: {desc}")


class AgentTimeout(Timeout, GuestError):
    """The agent did not answer in time (not running yet, or busy)."""


class AgentGone(GuestError, ChannelClosed):
    """The agent's channel closed (QEMU exited, or it was closed)."""


# -- qtest --------------------------------------------------------------------


class QtestError(VMError):
    """QEMU answered a qtest command with FAIL/ERR."""


class QtestClosed(ChannelClosed):
    """The qtest channel closed (QEMU exited, or it was closed)."""


# -- jobs and migration -------------------------------------------------------


class JobError(VMError):
    """A QEMU job (block job, `blockdev-create`, `snapshot-*`) ended in error;
    `job_id` names it, `error` is QEMU's own text."""

    def __init__(self, job_id: str, error: str, *, job_type: str = "", status: str = "") -> None:
        self.job_id = job_id
        self.error = error
        self.job_type = job_type
        self.status = status
        kind = f" ({job_type})" if job_type else ""
        super().__init__(f"job {job_id!r}{kind} failed: {error}")


class JobTimeout(JobError, Timeout):
    """A job did not end in time; it was cancelled (`cancelled` says whether
    the cancellation itself finished in time)."""

    def __init__(self, job_id: str, timeout: float | None, *, cancelled: bool) -> None:
        Timeout.__init__(self, f"job {job_id!r} to end", timeout)
        self.job_id = job_id
        self.error = str(self)
        self.job_type = ""
        self.status = ""
        self.cancelled = cancelled
        note = "it was cancelled" if cancelled else "it did not end even when cancelled"
        self.args = (f"{self}; {note}",)


class MigrationError(VMError):
    """A migration failed or was cancelled; `reason` is QEMU's `error-desc`."""

    def __init__(self, reason: str, *, status: str = "failed") -> None:
        self.reason = reason
        self.status = status
        super().__init__(f"migration {status}: {reason}")


class MigrationTimeout(MigrationError, Timeout):
    """A migration did not complete in time; it was cancelled."""

    def __init__(self, timeout: float | None, status: str) -> None:
        Timeout.__init__(self, "the migration to complete", timeout)
        self.reason = str(self)
        self.status = status
        self.args = (f"{self} (it was cancelled; last status {status!r})",)
