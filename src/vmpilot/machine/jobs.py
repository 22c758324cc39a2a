"""QEMU jobs followed to their end, written once as plans (see `_util.plan`).

A job-creating command (blockdev-backup, blockdev-mirror, block-stream,
block-commit, blockdev-create, x-blockdev-amend, snapshot-save/load/delete)
only starts a job; its end comes later, as events. The plan follows the
generic `JOB_STATUS_CHANGE` event (keyed `id`, the same spelling in QEMU 7.2
and 10.x; the older `BLOCK_JOB_*` events key the job as `device` and exist
only for block jobs, so they are only drained, never relied on), reads the
job's progress and error from `query-jobs`, and walks the state machine:
`ready` → `job-complete` (a mirror; or return there), `pending` →
`job-finalize` (when `auto-finalize` is off), `concluded` → read the error,
`job-dismiss`. Block jobs are started with `auto-dismiss: false` so that a
failed job is still there to be asked for its error.

A job that outlives its deadline is cancelled (`job-cancel`), the plan waits
for the cancellation (`CANCEL_TIMEOUT`) and raises `JobTimeout`. (A job
paused by its own error policy, `on-source-error: stop`, waits for the caller
and so runs into the deadline.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from collections.abc import Callable, Mapping
from typing import Any

from .._util.deadline import Deadline
from .._util.plan import Call, Plan
from ..errors import CommandError, JobError, JobTimeout

JOB_TIMEOUT = 300.0  # a whole job (copying an image under TCG can take minutes)
CANCEL_TIMEOUT = 10.0  # a cancelled job's way to `concluded`
REPLY_TIMEOUT = 30.0  # one command's reply: a QMP reply that times out closes the connection,
# so a command is never sent with what is left of the job's deadline (maybe nothing)
PROGRESS_INTERVAL = 0.5  # how often `query-jobs` is read while a progress callback listens

# commands whose jobs take `auto-dismiss` (the job-* ones always wait for a dismiss)
BLOCK_JOB_COMMANDS = frozenset(
    {"blockdev-backup", "drive-backup", "blockdev-mirror", "drive-mirror",
     "block-stream", "block-commit"}
)  # fmt: skip
BLOCK_JOB_EVENTS = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_READY",
                    "BLOCK_JOB_PENDING", "BLOCK_JOB_ERROR")  # fmt: skip
ENDED = ("concluded", "null")

ProgressCallback = Callable[[int, int], object]

_ids = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class Job:
    """One job as `query-jobs` reports it (or as it ended)."""

    id: str
    type: str
    status: str
    current: int = 0  # progress: work done, of `total` (units are the job's own)
    total: int = 0
    error: str | None = None

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> Job:
        return cls(
            id=info["id"],
            type=info.get("type", ""),
            status=info.get("status", ""),
            current=int(info.get("current-progress", 0)),
            total=int(info.get("total-progress", 0)),
            error=info.get("error"),
        )


def new_job_id() -> str:
    return f"vmpilot-job-{os.getpid()}-{next(_ids)}"


def list_jobs(qmp: object, deadline: Deadline) -> Plan[list[Job]]:
    infos = yield Call("qmp", qmp, "query-jobs", None, deadline)
    return [Job.from_info(info) for info in infos]


def reply() -> Deadline:
    return Deadline(REPLY_TIMEOUT)


def _find(qmp: object, job_id: str) -> Plan[Job | None]:
    jobs = yield from list_jobs(qmp, reply())
    return next((job for job in jobs if job.id == job_id), None)


def run_job(
    qmp: object,
    command: str,
    arguments: Mapping[str, Any] | None,
    deadline: Deadline,
    progress: ProgressCallback | None,
    complete: bool,
) -> Plan[Job]:
    """Start the job and follow it (see the module docstring)."""
    args = dict(arguments or {})
    job_id = args.setdefault("job-id", new_job_id())
    if command in BLOCK_JOB_COMMANDS:
        args.setdefault("auto-dismiss", False)
    yield Call("qmp", qmp, command, args, reply())
    return (yield from follow(qmp, job_id, deadline, progress, complete))


def follow(
    qmp: object,
    job_id: str,
    deadline: Deadline,
    progress: ProgressCallback | None,
    complete: bool,
) -> Plan[Job]:
    """Walk job `job_id` to its end (or to `ready` when not `complete`)."""
    last: Job | None = None
    status = ""
    completed = False
    while status not in ENDED:
        if deadline.expired:
            yield from _cancel_and_raise(qmp, job_id, deadline)
        wait = deadline.within(PROGRESS_INTERVAL) if progress is not None else deadline
        event = yield Call("event", qmp, "JOB_STATUS_CHANGE", {"id": job_id}, wait)
        if progress is not None or event is None or event.data["status"] == "concluded":
            job = yield from _find(qmp, job_id)
            if job is not None:
                if progress is not None and (last is None or job.current != last.current):
                    yield Call("report", progress, job.current, job.total)
                last = job
        if event is None:
            continue
        status = event.data["status"]
        if status == "ready":
            if not complete:
                return (yield from _find(qmp, job_id)) or Job(job_id, "", status)
            if not completed:  # a mirror may go ready → standby → ready again
                completed = True
                yield Call("qmp", qmp, "job-complete", {"id": job_id}, reply())
        elif status == "pending":
            job = yield from _find(qmp, job_id)
            if job is not None and job.status == "pending":  # not finalizing by itself
                with contextlib.suppress(CommandError):  # auto-finalize got there first
                    yield Call("qmp", qmp, "job-finalize", {"id": job_id}, reply())
    error = last.error if last is not None else None
    if status == "concluded":
        yield from _dismiss(qmp, job_id)
    # a caller's auto-dismiss=true may take the job away before query-jobs
    # sees its error: then BLOCK_JOB_COMPLETED's is the only copy
    error = error or (yield from _drain(qmp, job_id))
    final = (
        dataclasses.replace(last, status=status) if last is not None else Job(job_id, "", status)
    )
    if error is not None:
        raise JobError(job_id, error, job_type=final.type, status=status)
    return final


def _dismiss(qmp: object, job_id: str) -> Plan[None]:
    try:
        yield Call("qmp", qmp, "job-dismiss", {"id": job_id}, reply())
    except CommandError:
        if (yield from _find(qmp, job_id)) is not None:
            raise  # not gone by the caller's auto-dismiss: a real refusal


def _drain(qmp: object, job_id: str) -> Plan[str | None]:
    """Consume the job's events still queued (its `null`, the `BLOCK_JOB_*`
    twins); the error a `BLOCK_JOB_COMPLETED` carried, if any."""
    now = Deadline(0)
    while (yield Call("event", qmp, "JOB_STATUS_CHANGE", {"id": job_id}, now)) is not None:
        pass
    error = None
    while event := (yield Call("event", qmp, BLOCK_JOB_EVENTS, {"device": job_id}, now)):
        if event.name == "BLOCK_JOB_COMPLETED" and event.data.get("error"):
            error = str(event.data["error"])
    return error


def cancel(qmp: object, job_id: str, deadline: Deadline) -> Plan[Job]:
    """`job-cancel`, then wait for the end and dismiss; the job as it ended."""
    last = yield from _find(qmp, job_id)
    if last is None:
        raise JobError(job_id, "no such job", status="null")
    try:
        yield Call("qmp", qmp, "job-cancel", {"id": job_id}, reply())
    except CommandError:  # it ended by itself meanwhile (or cannot be cancelled)
        now = yield from _find(qmp, job_id)
        if now is not None and now.status not in ENDED:
            raise
        last = now or last
    status = last.status
    while status not in ENDED:
        event = yield Call("event", qmp, "JOB_STATUS_CHANGE", {"id": job_id}, deadline)
        if event is None:
            raise JobTimeout(job_id, deadline.timeout, cancelled=False)
        status = event.data["status"]
        if status == "concluded":
            last = (yield from _find(qmp, job_id)) or last
    if status == "concluded":
        yield from _dismiss(qmp, job_id)
    yield from _drain(qmp, job_id)
    return dataclasses.replace(last, status=status)


def _cancel_and_raise(qmp: object, job_id: str, deadline: Deadline) -> Plan[None]:
    try:
        yield from cancel(qmp, job_id, Deadline(CANCEL_TIMEOUT))
    except JobTimeout:
        raise JobTimeout(job_id, deadline.timeout, cancelled=False) from None
    raise JobTimeout(job_id, deadline.timeout, cancelled=True)
