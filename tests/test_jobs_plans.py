"""The job plan's decisions at its deadline, driven step by step with
scripted primitives (what real QEMU only shows by timing): after the deadline
no command is sent with the job's spent deadline (a reply timeout closes QMP),
and a job that ends by itself while being cancelled is not an error of the
cancellation."""

from __future__ import annotations

import time
from typing import Any

import pytest

from vmpilot import JobTimeout
from vmpilot._util.deadline import Deadline
from vmpilot._util.plan import run
from vmpilot.errors import CommandError
from vmpilot.machine import jobs
from vmpilot.qmp import Event


class Scripted:
    """Primitives of `_qmp_ops` answering from a script; records each command
    with the seconds its reply was given."""

    def __init__(self, statuses: list[str], cancel_fails: bool = False) -> None:
        self.sent: list[tuple[str, float | None]] = []
        self.status = "running"
        self.statuses = statuses
        self.cancel_fails = cancel_fails

    def qmp(self, client: object, command: str, args: Any, d: Deadline) -> Any:
        self.sent.append((command, d.remaining()))
        if command == "query-jobs":
            return [{"id": "j", "type": "backup", "status": self.status,
                     "current-progress": 1, "total-progress": 2}]  # fmt: skip
        if command == "job-cancel" and self.cancel_fails:
            self.status = "concluded"  # it ended by itself just before
            raise CommandError(command, args, "GenericError", "cannot accept verb 'cancel'")
        return {}

    def event(self, client: object, names: Any, match: Any, d: Deadline) -> Event | None:
        if not self.statuses:
            if d.at is not None:
                d.at = time.monotonic()  # the wait ran until its deadline (no real waiting)
            return None
        self.status = self.statuses.pop(0)
        return Event("JOB_STATUS_CHANGE", {"id": "j", "status": self.status}, 0, 0)

    def report(self, callback: Any, *values: Any) -> None:
        callback(*values)


def test_commands_after_the_deadline_get_their_own_time() -> None:
    io = Scripted([])  # the job never moves: the deadline passes while waiting for it
    plan = jobs.run_job(None, "blockdev-backup", {"job-id": "j"}, Deadline(60), None, True)
    with pytest.raises(JobTimeout) as info:
        run(plan, _CancelThenConclude(io))
    assert info.value.cancelled
    after = [(c, left) for c, left in io.sent if c != "blockdev-backup"]
    assert "job-cancel" in [c for c, _ in after]
    assert all(left is not None and left > 1 for _, left in after), after


def test_a_job_that_ends_while_being_cancelled_is_a_timeout_not_a_command_error() -> None:
    io = Scripted([], cancel_fails=True)
    plan = jobs.run_job(None, "blockdev-backup", {"job-id": "j"}, Deadline(0), None, True)
    with pytest.raises(JobTimeout) as info:
        run(plan, io)
    assert info.value.cancelled
    assert [c for c, _ in io.sent][-2:] == ["query-jobs", "job-dismiss"]


class _CancelThenConclude:
    """`Scripted`, where the job concludes once it is cancelled."""

    def __init__(self, io: Scripted) -> None:
        self.io = io

    def __getattr__(self, name: str) -> Any:
        return getattr(self.io, name)

    def qmp(self, client: object, command: str, args: Any, d: Deadline) -> Any:
        if command == "job-cancel":
            self.io.statuses = ["aborting", "concluded"]
        return self.io.qmp(client, command, args, d)
