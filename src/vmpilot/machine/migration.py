"""Live migration between two local QEMUs, written once as a plan.

The channel is a socketpair: one end goes to each QEMU by SCM_RIGHTS
(`getfd` under `FD_NAME`), and both are told `fd:FD_NAME`. No TCP port is
chosen, so nothing can race for it and nothing listens. The destination
must have been launched with `MachineConfig(incoming=True)` (`-incoming
defer`), so it is waiting for `migrate-incoming`.

The plan turns on the `events` capability on both sides (QEMU emits
`MIGRATION` events only then) with the caller's capabilities, starts the
incoming side, then the outgoing one, and follows the source's `MIGRATION`
events to `completed`, `failed` or `cancelled`, reading `query-migrate` for
progress. A failure raises `MigrationError` with QEMU's `error-desc`; the
source then keeps running. Past the deadline the migration is cancelled
(`migrate_cancel`) and `MigrationTimeout` raised.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from .._util.deadline import Deadline
from .._util.plan import Call, Plan
from ..errors import ConfigError, MigrationError, MigrationTimeout
from .config import MachineConfig

MIGRATE_TIMEOUT = 300.0
CANCEL_TIMEOUT = 10.0
REPLY_TIMEOUT = 30.0  # each command's own (a reply timeout would close the QMP connection)
PROGRESS_INTERVAL = 0.5
FD_NAME = "vmpilot-migration"
ENDED = ("completed", "failed", "cancelled")

# (status, bytes transferred, bytes remaining, total bytes), from query-migrate's "ram"
MigrationProgress = Callable[[str, int, int, int], object]


@dataclasses.dataclass(frozen=True)
class MigrationResult:
    """How a completed migration went (from the source's `query-migrate`)."""

    status: str
    total_time_ms: int
    downtime_ms: int
    transferred: int  # RAM bytes sent
    source_status: str  # the source VM's run state: `postmigrate`
    destination_status: str  # the destination's: `running` (or `paused` under -S)


def check_destination(config: MachineConfig) -> None:
    if not config.incoming:
        raise ConfigError(
            "the migration destination must be launched with incoming=True "
            "(QEMU's -incoming defer), e.g. image.config(incoming=True)"
        )


def capability_list(capabilities: Mapping[str, bool]) -> list[dict[str, Any]]:
    caps = {"events": True, **capabilities}
    return [{"capability": name, "state": bool(on)} for name, on in caps.items()]


def _reply() -> Deadline:
    return Deadline(REPLY_TIMEOUT)


def migrate(
    src: object,
    dst: object,
    deadline: Deadline,
    progress: MigrationProgress | None,
    capabilities: Mapping[str, bool],
    parameters: Mapping[str, Any],
) -> Plan[MigrationResult]:
    caps = {"capabilities": capability_list(capabilities)}
    yield Call("qmp", src, "migrate-set-capabilities", caps, _reply())
    yield Call("qmp", dst, "migrate-set-capabilities", caps, _reply())
    if parameters:
        yield Call("qmp", src, "migrate-set-parameters", dict(parameters), _reply())
    ours, theirs = yield Call("socketpair")
    try:
        yield Call("send_fd", dst, theirs, FD_NAME, _reply())
        yield Call("send_fd", src, ours, FD_NAME, _reply())
    finally:
        yield Call("close_fds", (ours, theirs))  # each QEMU holds its own copy now
    uri = {"uri": f"fd:{FD_NAME}"}
    yield Call("qmp", dst, "migrate-incoming", uri, _reply())
    yield Call("qmp", src, "migrate", uri, _reply())
    info = yield from _follow(src, deadline, progress)
    status = info.get("status", "")
    if status != "completed":
        why = info.get("error-desc") or f"QEMU reported {status!r} and no reason"
        raise MigrationError(why, status=status)
    dst_status = yield from _destination_done(dst, deadline)
    src_run = yield Call("qmp", src, "query-status", None, _reply())
    info = yield Call("qmp", src, "query-migrate", None, _reply())  # total-time comes late
    ram = info.get("ram", {})
    return MigrationResult(
        status=status,
        total_time_ms=int(info.get("total-time", 0)),
        downtime_ms=int(info.get("downtime", 0)),
        transferred=int(ram.get("transferred", 0)),
        source_status=src_run["status"],
        destination_status=dst_status,
    )


def _follow(src: object, deadline: Deadline, progress: MigrationProgress | None) -> Plan[Any]:
    """The source's `query-migrate` once the migration has ended."""
    while True:
        if deadline.expired:
            yield from _cancel(src, deadline)
        wait = deadline.within(PROGRESS_INTERVAL) if progress is not None else deadline
        event = yield Call("event", src, "MIGRATION", None, wait)
        if event is not None and event.data.get("status") not in ENDED and progress is None:
            continue
        info = yield Call("qmp", src, "query-migrate", None, _reply())
        if progress is not None and "ram" in info:
            ram = info["ram"]
            values = (info.get("status", ""), ram.get("transferred", 0),
                      ram.get("remaining", 0), ram.get("total", 0))  # fmt: skip
            yield Call("report", progress, *values)
        if info.get("status") in ENDED:
            return info


def _cancel(src: object, deadline: Deadline) -> Plan[None]:
    d = Deadline(CANCEL_TIMEOUT)
    yield Call("qmp", src, "migrate_cancel", None, _reply())
    status = "cancelling"
    while status not in ENDED:
        event = yield Call("event", src, "MIGRATION", None, d)
        if event is None:
            break
        status = event.data.get("status", "")
    raise MigrationTimeout(deadline.timeout, status)


def _destination_done(dst: object, deadline: Deadline) -> Plan[str]:
    """Wait until the destination has taken over; its run state."""
    while True:
        state = yield Call("qmp", dst, "query-status", None, _reply())
        if state["status"] != "inmigrate":
            return str(state["status"])
        event = yield Call("event", dst, ("MIGRATION", "RESUME"), None, deadline)
        if event is None:
            raise MigrationTimeout(deadline.timeout, "the destination did not take over")
