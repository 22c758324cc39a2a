"""The job, migration and snapshot operations of `Machine` and `AsyncMachine`.

Each is a thin method over a plan of `jobs`, `migration` or `snapshots`, run
with the primitives of `_qmp_ops` on the VM's QMP client; the two mixins
differ only in the runner (`run` or `arun`), so the faces cannot drift.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._util.deadline import Deadline
from .._util.plan import arun, run
from . import jobs, migration, snapshots
from ._common import COMMAND_TIMEOUT
from ._qmp_ops import AsyncOps, SyncOps
from .jobs import CANCEL_TIMEOUT, JOB_TIMEOUT, Job, ProgressCallback
from .migration import MIGRATE_TIMEOUT, MigrationProgress, MigrationResult
from .snapshots import SNAPSHOT_TIMEOUT

if TYPE_CHECKING:
    from ..qmp import AsyncQMPClient, QMPClient
    from .aio import AsyncMachine
    from .lifecycle import Lifecycle
    from .sync import Machine

_SYNC = SyncOps()
_ASYNC = AsyncOps()


class SyncStorage:
    """Jobs, migration and snapshots for `Machine`."""

    _life: Lifecycle
    if TYPE_CHECKING:

        @property
        def qmp(self) -> QMPClient: ...

    def _state(self) -> str | None:
        """Where the snapshot state disk goes (the VM's private temp dir), if asked for."""
        return self._life.temp_dir if self._life.config.snapshots else None

    def run_job(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = JOB_TIMEOUT,
        progress: ProgressCallback | None = None,
        complete: bool = True,
    ) -> Job:
        """Start a job-creating command and follow the job to its end: a
        mirror is completed at `ready` (or returned there if not `complete`);
        it is finalized and dismissed as needed. `progress(current, total)`
        is called as it advances. Failure: `JobError` with QEMU's text; past
        `timeout` the job is cancelled and `JobTimeout` raised."""
        plan = jobs.run_job(self.qmp, command, arguments, Deadline(timeout), progress, complete)
        return run(plan, _SYNC)

    def complete_job(
        self,
        job_id: str,
        *,
        timeout: float | None = JOB_TIMEOUT,
        progress: ProgressCallback | None = None,
    ) -> Job:
        """`job-complete` a job left at `ready` (`complete=False`), then follow it to its end."""
        self.qmp.execute("job-complete", {"id": job_id}, timeout=timeout)
        return run(jobs.follow(self.qmp, job_id, Deadline(timeout), progress, True), _SYNC)

    def jobs(self, *, timeout: float | None = COMMAND_TIMEOUT) -> list[Job]:
        """The current jobs (`query-jobs`)."""
        return run(jobs.list_jobs(self.qmp, Deadline(timeout)), _SYNC)

    def cancel_job(self, job_id: str, *, timeout: float | None = CANCEL_TIMEOUT) -> Job:
        """Cancel a job, wait for its end, dismiss it; the job as it ended."""
        return run(jobs.cancel(self.qmp, job_id, Deadline(timeout)), _SYNC)

    def migrate(
        self,
        dst: Machine,
        *,
        timeout: float | None = MIGRATE_TIMEOUT,
        progress: MigrationProgress | None = None,
        capabilities: Mapping[str, bool] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> MigrationResult:
        """Migrate this VM into `dst` (launched with `incoming=True`) over a
        socketpair passed to both by fd. `progress(status, transferred,
        remaining, total)` in bytes; `capabilities` (e.g. `{"postcopy-ram":
        True}`) go to both sides, `parameters` to the source. Failure:
        `MigrationError` with QEMU's reason (the source keeps running)."""
        migration.check_destination(dst.config)
        plan = migration.migrate(
            self.qmp, dst.qmp, Deadline(timeout), progress, capabilities or {}, parameters or {}
        )
        return run(plan, _SYNC)

    def snapshot_save(
        self,
        name: str,
        *,
        vmstate: str | None = None,
        devices: Sequence[str] | None = None,
        timeout: float | None = SNAPSHOT_TIMEOUT,
    ) -> Job:
        """Save the whole VM as snapshot `name` (`snapshot-save`); see `snapshots`."""
        plan = snapshots.save(self.qmp, name, self._state(), vmstate, devices, Deadline(timeout))
        return run(plan, _SYNC)

    def snapshot_load(
        self,
        name: str,
        *,
        vmstate: str | None = None,
        devices: Sequence[str] | None = None,
        timeout: float | None = SNAPSHOT_TIMEOUT,
    ) -> Job:
        """Revert the VM to snapshot `name` (`snapshot-load`). On failure QEMU
        leaves the VM stopped (`restore-vm`: its state may be half loaded)."""
        plan = snapshots.load(self.qmp, name, self._state(), vmstate, devices, Deadline(timeout))
        return run(plan, _SYNC)

    def snapshot_delete(
        self,
        name: str,
        *,
        devices: Sequence[str] | None = None,
        timeout: float | None = SNAPSHOT_TIMEOUT,
    ) -> Job:
        """Delete snapshot `name` (`snapshot-delete`)."""
        plan = snapshots.delete(self.qmp, name, self._state(), devices, Deadline(timeout))
        return run(plan, _SYNC)


class AsyncStorage:
    """Jobs, migration and snapshots for `AsyncMachine` (see `SyncStorage`)."""

    _life: Lifecycle
    if TYPE_CHECKING:

        @property
        def qmp(self) -> AsyncQMPClient: ...

    def _state(self) -> str | None:
        """Where the snapshot state disk goes (the VM's private temp dir), if asked for."""
        return self._life.temp_dir if self._life.config.snapshots else None

    async def run_job(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = JOB_TIMEOUT,
        progress: ProgressCallback | None = None,
        complete: bool = True,
    ) -> Job:
        """See `Machine.run_job`."""
        plan = jobs.run_job(self.qmp, command, arguments, Deadline(timeout), progress, complete)
        return await arun(plan, _ASYNC)

    async def complete_job(
        self,
        job_id: str,
        *,
        timeout: float | None = JOB_TIMEOUT,
        progress: ProgressCallback | None = None,
    ) -> Job:
        """See `Machine.complete_job`."""
        await self.qmp.execute("job-complete", {"id": job_id}, timeout=timeout)
        return await arun(jobs.follow(self.qmp, job_id, Deadline(timeout), progress, True), _ASYNC)

    async def jobs(self, *, timeout: float | None = COMMAND_TIMEOUT) -> list[Job]:
        """The current jobs (`query-jobs`)."""
        return await arun(jobs.list_jobs(self.qmp, Deadline(timeout)), _ASYNC)

    async def cancel_job(self, job_id: str, *, timeout: float | None = CANCEL_TIMEOUT) -> Job:
        """See `Machine.cancel_job`."""
        return await arun(jobs.cancel(self.qmp, job_id, Deadline(timeout)), _ASYNC)

    async def migrate(
        self,
        dst: AsyncMachine,
        *,
        timeout: float | None = MIGRATE_TIMEOUT,
        progress: MigrationProgress | None = None,
        capabilities: Mapping[str, bool] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> MigrationResult:
        """See `Machine.migrate`."""
        migration.check_destination(dst.config)
        plan = migration.migrate(
            self.qmp, dst.qmp, Deadline(timeout), progress, capabilities or {}, parameters or {}
        )
        return await arun(plan, _ASYNC)

    async def snapshot_save(
        self,
        name: str,
        *,
        vmstate: str | None = None,
        devices: Sequence[str] | None = None,
        timeout: float | None = SNAPSHOT_TIMEOUT,
    ) -> Job:
        """See `Machine.snapshot_save`."""
        plan = snapshots.save(self.qmp, name, self._state(), vmstate, devices, Deadline(timeout))
        return await arun(plan, _ASYNC)

    async def snapshot_load(
        self,
        name: str,
        *,
        vmstate: str | None = None,
        devices: Sequence[str] | None = None,
        timeout: float | None = SNAPSHOT_TIMEOUT,
    ) -> Job:
        """See `Machine.snapshot_load`."""
        plan = snapshots.load(self.qmp, name, self._state(), vmstate, devices, Deadline(timeout))
        return await arun(plan, _ASYNC)

    async def snapshot_delete(
        self,
        name: str,
        *,
        devices: Sequence[str] | None = None,
        timeout: float | None = SNAPSHOT_TIMEOUT,
    ) -> Job:
        """See `Machine.snapshot_delete`."""
        plan = snapshots.delete(self.qmp, name, self._state(), devices, Deadline(timeout))
        return await arun(plan, _ASYNC)
