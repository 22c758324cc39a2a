"""snapshot_save/load/delete on real QEMU: the bundled guest with a state
disk made on first use, a user's own qcow2 disk, the error without one, and
the asyncio face."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import run_async
from test_jobs_storage import QEMU_IMG, img

from vmpilot import AsyncMachine, JobError, VMError
from vmpilot.machine import snapshots
from vmpilot.pytest_plugin import VMFactory


def names(vm: Any) -> list[str]:
    info = vm.execute("query-named-block-nodes", {"flat": True})
    return sorted(n["node-name"] for n in info if not n["node-name"].startswith("#"))


def test_save_load_delete_restore_the_guest(vm_factory: VMFactory, linux_guest: Any) -> None:
    vm = vm_factory(linux_guest.config(snapshots=True))
    vm.shell.wait_ready(timeout=180)
    vm.shell.check("echo saved > /tmp/state")
    job = vm.snapshot_save("one")
    assert (job.type, job.status) == ("snapshot-save", "concluded")
    state = os.path.join(vm.temp_dir or "", "snapshot-state.qcow2")
    assert os.path.exists(state)  # in the VM's private temp dir: it goes with it
    assert names(vm) == [snapshots.STATE_NODE, snapshots.STATE_FILE_NODE]
    vm.shell.check("echo changed > /tmp/state; touch /tmp/new")
    assert vm.snapshot_load("one").type == "snapshot-load"
    assert vm.shell.check("cat /tmp/state; ls /tmp/new 2>&1 || true", timeout=30) == (
        "saved\nls: /tmp/new: No such file or directory\n"
    )
    listed = subprocess.run([QEMU_IMG, "snapshot", "-U", "-l", state], capture_output=True,
                            text=True, timeout=30).stdout  # fmt: skip
    assert " one " in listed
    vm.snapshot_delete("one")
    with pytest.raises(JobError) as info:
        vm.snapshot_load("one")
    assert "one" in info.value.error  # QEMU: snapshot 'one' not found (its words)
    # QEMU leaves a VM whose load failed stopped (its state may be half loaded)
    assert vm.execute("query-status")["status"] == "restore-vm"
    temp = vm.temp_dir
    vm.shutdown(timeout=30)
    assert temp is not None and not os.path.exists(temp)


def test_a_users_qcow2_disk_holds_the_state(vm_factory: VMFactory, tmp_path: Path) -> None:
    disk = img(tmp_path / "disk.qcow2")
    vm = vm_factory(machine="none", memory=32)
    vm.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk",
                                "file": {"driver": "file", "filename": disk}})  # fmt: skip
    vm.snapshot_save("s", vmstate="disk")
    vm.snapshot_load("s", vmstate="disk")
    vm.snapshot_delete("s", devices=["disk"])
    vm.shutdown()


def test_without_a_state_disk_the_error_says_what_to_do(vm_factory: VMFactory) -> None:
    vm = vm_factory(machine="none", memory=32)
    with pytest.raises(VMError, match="snapshots=True"):
        vm.snapshot_save("s")
    vm.shutdown()


def test_the_asyncio_face_saves_and_loads() -> None:
    async def main() -> list[str]:
        async with AsyncMachine(machine="none", memory=32, snapshots=True) as vm:
            await vm.snapshot_save("a")
            await vm.snapshot_load("a")
            await vm.snapshot_delete("a")
            return [j.id for j in await vm.jobs()]

    assert run_async(main()) == []
