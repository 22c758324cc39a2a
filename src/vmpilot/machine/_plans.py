"""Machine operations written once, as plans (see `_util.plan`).

Each plan holds an operation's whole logic: which state it starts from, the
order of its steps, the deadline every step shares, the fallback to a kill
and the verdict. `Machine` and `AsyncMachine` run the same plans; each only
supplies the primitives, as methods of its `_io` object:

- `start()`: spawn QEMU (`Lifecycle.start`);
- `connect()`: wrap our ends of the socketpairs in the channel clients;
- `read_greeting(deadline)`, `negotiate(deadline)`: the QMP handshake;
- `running()`: the VM is up (start watching for its exit);
- `execute(command, deadline)`: one QMP command;
- `wait_exited(deadline) -> bool`: whether QEMU exited before the deadline;
- `kill_process()`: SIGKILL, not waiting;
- `cleanup()`: QEMU is gone (or beyond help): reap it, run the post-shutdown step.
"""

from __future__ import annotations

import logging
from typing import Literal

from .._util.deadline import Deadline
from .._util.plan import Call, Plan
from ..errors import LaunchError, ProtocolError, QMPError, Timeout
from .lifecycle import Lifecycle, State

Method = Literal["quit", "powerdown"]
METHODS = ("quit", "powerdown")
DRAIN_TIMEOUT = 1.0  # QEMU gone: reading the rest of what it sent, up to its end of stream
FINISH_TIMEOUT = 10.0  # QEMU's exit after SIGKILL (only a stuck kernel delays it)
log = logging.getLogger("vmpilot.machine")
# what the faces' QMP listener hands to `Lifecycle.record_event`
VERDICT_EVENTS = ("SHUTDOWN", "GUEST_PANICKED")
EXIT_GRACE = 5.0  # QMP hung up during launch: how long QEMU gets to exit (its error is in its log)


def _secs(deadline: Deadline) -> str:
    return "ever" if deadline.timeout is None else f"{deadline.timeout:g} s"


def launch(life: Lifecycle, deadline: Deadline) -> Plan[None]:
    """Spawn, then greeting and capabilities within `deadline`; a failure
    says which step failed, and garbage from QEMU fails at once."""
    yield Call("start")  # on failure, everything it made is undone
    step = "QMP greeting"
    try:
        yield Call("connect")
        yield Call("read_greeting", deadline)
        step = "answer to qmp_capabilities (the greeting came)"
        yield Call("negotiate", deadline)
    except Timeout as exc:
        raise (yield from _fail(life, f"no {step} within {_secs(deadline)}", exc)) from exc
    except ProtocolError as exc:  # waiting longer cannot make garbage right
        raise (yield from _fail(life, f"malformed QMP instead of a {step}: {exc}", exc)) from exc
    except (QMPError, OSError) as exc:
        # most often QEMU exited on a bad option: let it finish, so its log is whole
        grace = deadline.remaining()
        yield Call("wait_exited", Deadline(EXIT_GRACE if grace is None else min(grace, EXIT_GRACE)))
        why = f"QMP failed while waiting for the {step} ({exc})"
        raise (yield from _fail(life, why, exc)) from exc
    except GeneratorExit:
        raise
    except BaseException as exc:
        raise (yield from _fail(life, f"interrupted ({exc!r})", exc)) from exc
    life.move(State.RUNNING)
    log.info("%s: ready (QMP negotiated)", life.label)
    yield Call("running")


def _fail(life: Lifecycle, why: str, cause: BaseException) -> Plan[LaunchError]:
    """Kill what is left of a failed launch, let it be reaped, clean up."""
    yield Call("kill_process")
    yield Call("wait_exited", Deadline(FINISH_TIMEOUT))
    return life.launch_failed(why, cause)


def shutdown(life: Lifecycle, method: Method, deadline: Deadline) -> Plan[None]:
    """Graceful, else killed and `AbnormalShutdown` (see `Lifecycle.check_shutdown`)."""
    if method not in METHODS:
        raise ValueError(f"shutdown method must be one of {METHODS}, not {method!r}")
    if life.state in (State.NEW, State.FAILED):
        return
    if not life.claim(State.RUNNING, State.SHUTTING_DOWN):
        # it ended already, or is ending by itself (the exit watcher has it)
        yield from _finish()
        _raise_unreported_crash(life)
        return
    command = "quit" if method == "quit" else "system_powerdown"
    log.info("%s: shutting down (%s, %s)", life.label, command, _secs(deadline))
    cause: BaseException | None = None
    what = ""
    try:
        yield Call("execute", command, deadline)
        if not (yield Call("wait_exited", deadline)):
            what = f"QEMU did not exit within {_secs(deadline)} of {command!r}"
            cause = Timeout(f"QEMU to exit after {command!r}", deadline.timeout)
    except (QMPError, Timeout) as exc:
        # QEMU may be exiting anyway (a `quit` sent earlier, a guest poweroff
        # racing ours): only a QEMU still there is a failure
        if not (yield Call("wait_exited", deadline)):
            what = f"graceful shutdown ({method}) failed: {exc}"
            cause = exc
    except GeneratorExit:
        raise
    except BaseException:
        yield from _finish()
        raise
    yield from _finish()
    life.check_shutdown(method, what, cause)


def wait(life: Lifecycle, deadline: Deadline) -> Plan[int | None]:
    """For a VM exiting by itself: its exit code; not gone in time → killed,
    raise; a guest that panicked (or reset under no_reboot) → raise."""
    if life.state in (State.NEW, State.FAILED):
        return life.exit_code
    if life.state is not State.STOPPED:
        log.info("%s: waiting for QEMU to exit by itself (%s)", life.label, _secs(deadline))
        exited = yield Call("wait_exited", deadline)
        life.claim(State.RUNNING, State.SHUTTING_DOWN)
        yield from _finish()
        if not exited:
            raise life.abnormal(f"QEMU did not exit by itself within {_secs(deadline)}", None)
    _raise_unreported_crash(life)
    return life.exit_code


def kill(life: Lifecycle) -> Plan[None]:
    """Hard on purpose: SIGKILL and clean up; raises nothing."""
    if life.state in (State.NEW, State.FAILED, State.STOPPED):
        return
    life.claim(State.RUNNING, State.SHUTTING_DOWN)
    log.info("%s: kill() called", life.label)
    yield Call("kill_process")
    yield from _finish()


def _finish() -> Plan[None]:
    """Make sure QEMU is gone, then the post-shutdown step (it runs once)."""
    if not (yield Call("wait_exited", Deadline(0))):
        yield Call("kill_process")
        yield Call("wait_exited", Deadline(FINISH_TIMEOUT))
    yield Call("cleanup")


def _raise_unreported_crash(life: Lifecycle) -> None:
    """QEMU crashed, or the guest panicked or reset (`Lifecycle.verdict`)."""
    err = life.verdict()
    if err is not None:
        raise err
