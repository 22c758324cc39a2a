"""Jobs against real QEMU (`-machine none`, block nodes on qcow2 files):
backup, mirror (completed and left at READY), stream and commit on a chain,
each result checked by `qemu-img compare`; an ENOSPC injected with blkdebug;
a timeout that cancels; the asyncio face. Run with `VMPILOT_QEMU=.../qemu-10`
to check the QEMU 10.x spellings too."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import QEMU, run_async

from vmpilot import AsyncMachine, JobError, JobTimeout, Machine

_BESIDE = os.path.join(os.path.dirname(os.path.abspath(shutil.which(QEMU) or QEMU)), "qemu-img")
QEMU_IMG = _BESIDE if os.path.exists(_BESIDE) else "qemu-img"
QEMU_IO = os.path.join(os.path.dirname(QEMU_IMG), "qemu-io") if os.sep in QEMU_IMG else "qemu-io"
SIZE = "16M"


def img(path: Path, backing: Path | None = None) -> str:
    cmd = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
    if backing is not None:
        cmd += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run([*cmd, str(path), SIZE], check=True, timeout=30)
    return str(path)


def write(path: str, pattern: int, offset: str, length: str) -> None:
    io = [QEMU_IO, "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset} {length}", path]
    subprocess.run(io, check=True, timeout=30, capture_output=True)


def same(a: str, b: str) -> bool:
    out = subprocess.run([QEMU_IMG, "compare", "-U", a, b], capture_output=True, timeout=60)
    return out.returncode == 0


def qcow2(vm: Machine, name: str, path: str, **more: Any) -> None:
    vm.execute("blockdev-add", {"driver": "qcow2", "node-name": name,
                                "file": {"driver": "file", "filename": path}, **more})  # fmt: skip


@pytest.fixture
def images(tmp_path: Path) -> tuple[str, str]:
    src, dst = img(tmp_path / "src.qcow2"), img(tmp_path / "dst.qcow2")
    write(src, 0x5A, "0", "4M")
    write(src, 0xA5, "8M", "1M")
    assert not same(src, dst)  # so that `same` after a job means the job copied
    return src, dst


def test_backup_copies_the_image_and_reports_progress(
    qmp_vm: Machine, images: tuple[str, str]
) -> None:
    src, dst = images
    qcow2(qmp_vm, "src", src)
    qcow2(qmp_vm, "dst", dst)
    seen: list[tuple[int, int]] = []
    args = {"device": "src", "target": "dst", "sync": "full"}
    job = qmp_vm.run_job("blockdev-backup", args, progress=lambda c, t: seen.append((c, t)))
    assert (job.type, job.status, job.error) == ("backup", "concluded", None)
    assert job.id.startswith("vmpilot-job-") and job.current == job.total > 0
    assert seen and seen[-1] == (job.total, job.total)
    assert qmp_vm.jobs() == []  # dismissed
    qmp_vm.execute("blockdev-del", {"node-name": "dst"})
    assert same(src, dst)


def test_mirror_is_completed_at_ready(qmp_vm: Machine, images: tuple[str, str]) -> None:
    src, dst = images
    qcow2(qmp_vm, "src", src)
    qcow2(qmp_vm, "dst", dst)
    job = qmp_vm.run_job(
        "blockdev-mirror", {"job-id": "m1", "device": "src", "target": "dst", "sync": "full"}
    )
    assert (job.id, job.type, job.status) == ("m1", "mirror", "concluded")
    assert qmp_vm.jobs() == []
    qmp_vm.execute("blockdev-del", {"node-name": "dst"})
    assert same(src, dst)


def test_mirror_left_at_ready_then_completed(qmp_vm: Machine, images: tuple[str, str]) -> None:
    src, dst = images
    qcow2(qmp_vm, "src", src)
    qcow2(qmp_vm, "dst", dst)
    args = {"device": "src", "target": "dst", "sync": "full"}
    job = qmp_vm.run_job("blockdev-mirror", args, complete=False)
    assert job.status == "ready"
    assert [(j.id, j.status) for j in qmp_vm.jobs()] == [(job.id, "ready")]
    done = qmp_vm.complete_job(job.id)
    assert done.status == "concluded" and qmp_vm.jobs() == []
    qmp_vm.execute("blockdev-del", {"node-name": "dst"})
    assert same(src, dst)


def test_cancel_job_ends_a_ready_mirror(qmp_vm: Machine, images: tuple[str, str]) -> None:
    src, dst = images
    qcow2(qmp_vm, "src", src)
    qcow2(qmp_vm, "dst", dst)
    args = {"device": "src", "target": "dst", "sync": "full"}
    job = qmp_vm.run_job("blockdev-mirror", args, complete=False)
    ended = qmp_vm.cancel_job(job.id)
    assert ended.id == job.id and ended.status == "concluded"
    assert qmp_vm.jobs() == []


def test_stream_and_commit_on_a_chain(qmp_vm: Machine, tmp_path: Path) -> None:
    """base ← mid ← top; stream pulls base into top, commit pushes mid into base."""
    base = img(tmp_path / "base.qcow2")
    write(base, 0x11, "0", "2M")
    mid = img(tmp_path / "mid.qcow2", Path(base))
    write(mid, 0x22, "4M", "2M")
    top = img(tmp_path / "top.qcow2", Path(mid))
    write(top, 0x33, "8M", "1M")
    flat = str(tmp_path / "flat.qcow2")  # what the guest sees, for comparing
    subprocess.run([QEMU_IMG, "convert", "-U", "-O", "qcow2", top, flat], check=True, timeout=60)

    qcow2(qmp_vm, "top", top)
    job = qmp_vm.run_job("block-stream", {"device": "top"})
    assert (job.type, job.status) == ("stream", "concluded")
    qmp_vm.execute("blockdev-del", {"node-name": "top"})
    info = subprocess.run([QEMU_IMG, "info", "-U", top], capture_output=True, text=True)
    assert "backing file" not in info.stdout  # top stands alone now
    assert same(top, flat)

    top2 = img(tmp_path / "top2.qcow2", Path(mid))
    qcow2(qmp_vm, "top2", top2)
    nodes = {n["node-name"]: n for n in qmp_vm.execute("query-named-block-nodes")}
    mid_node = next(n for n, v in nodes.items() if v["file"] == mid)
    base_node = next(n for n, v in nodes.items() if v["file"] == base)
    job = qmp_vm.run_job("block-commit", {"device": "top2", "top-node": mid_node,
                                          "base-node": base_node})  # fmt: skip
    assert (job.type, job.status) == ("commit", "concluded")
    qmp_vm.execute("blockdev-del", {"node-name": "top2"})
    expected = str(tmp_path / "expected.qcow2")
    subprocess.run(
        [QEMU_IMG, "convert", "-U", "-O", "qcow2", mid, expected], check=True, timeout=60
    )
    assert same(base, expected)  # base now holds what mid showed


def test_blockdev_create_makes_an_image(qmp_vm: Machine, tmp_path: Path) -> None:
    path = str(tmp_path / "new.qcow2")
    file_opts = {"driver": "file", "filename": path, "size": 0}
    assert qmp_vm.run_job("blockdev-create", {"options": file_opts}).type == "create"
    qmp_vm.execute("blockdev-add", {"driver": "file", "node-name": "f", "filename": path})
    qmp_vm.run_job(
        "blockdev-create", {"options": {"driver": "qcow2", "file": "f", "size": 1 << 20}}
    )
    qmp_vm.execute("blockdev-del", {"node-name": "f"})
    info = subprocess.run([QEMU_IMG, "info", path], capture_output=True, text=True, timeout=30)
    assert "file format: qcow2" in info.stdout and qmp_vm.jobs() == []


def test_an_injected_enospc_raises_job_error_with_qemus_text(
    qmp_vm: Machine, images: tuple[str, str]
) -> None:
    src, dst = images
    qcow2(qmp_vm, "src", src)
    blkdebug = {"driver": "blkdebug", "image": {"driver": "file", "filename": dst},
                "inject-error": [{"event": "write_aio", "errno": 28}]}  # fmt: skip
    qmp_vm.execute("blockdev-add", {"driver": "qcow2", "node-name": "dst", "file": blkdebug})
    with pytest.raises(JobError) as info:
        qmp_vm.run_job("blockdev-backup", {"job-id": "b1", "device": "src", "target": "dst",
                                           "sync": "full"})  # fmt: skip
    assert info.value.job_id == "b1" and info.value.job_type == "backup"
    assert info.value.error == "No space left on device"
    assert qmp_vm.jobs() == []  # dismissed even so


def test_the_error_survives_a_callers_auto_dismiss(
    qmp_vm: Machine, images: tuple[str, str]
) -> None:
    """With auto-dismiss on, the job can be gone before `query-jobs` sees its
    error: BLOCK_JOB_COMPLETED's copy is used."""
    src, dst = images
    qcow2(qmp_vm, "src", src)
    blkdebug = {"driver": "blkdebug", "image": {"driver": "file", "filename": dst},
                "inject-error": [{"event": "write_aio", "errno": 5}]}  # fmt: skip
    qmp_vm.execute("blockdev-add", {"driver": "qcow2", "node-name": "dst", "file": blkdebug})
    with pytest.raises(JobError) as info:
        qmp_vm.run_job("blockdev-backup", {"device": "src", "target": "dst", "sync": "full",
                                           "auto-dismiss": True})  # fmt: skip
    assert info.value.error == "Input/output error"
    assert qmp_vm.jobs() == []


def test_a_timeout_cancels_the_job(qmp_vm: Machine, images: tuple[str, str]) -> None:
    src, dst = images
    qcow2(qmp_vm, "src", src)
    qcow2(qmp_vm, "dst", dst)
    args = {"job-id": "slow", "device": "src", "target": "dst", "sync": "full",
            "speed": 64 * 1024}  # 5 MiB at 64 KiB/s: over a minute  # fmt: skip
    with pytest.raises(JobTimeout) as info:
        qmp_vm.run_job("blockdev-backup", args, timeout=0.5)
    assert info.value.job_id == "slow" and info.value.cancelled
    assert qmp_vm.jobs() == []  # cancelled, waited for, dismissed


def test_the_asyncio_face_runs_the_same_jobs(images: tuple[str, str]) -> None:
    src, dst = images

    async def main() -> tuple[str, list[Any]]:
        async with AsyncMachine(machine="none", memory=32) as vm:
            for name, path in (("src", src), ("dst", dst)):
                file = {"driver": "file", "filename": path}
                await vm.execute("blockdev-add", {"driver": "qcow2", "node-name": name,
                                                  "file": file})  # fmt: skip
            job = await vm.run_job(
                "blockdev-backup", {"device": "src", "target": "dst", "sync": "full"}
            )
            await vm.execute("blockdev-del", {"node-name": "dst"})
            return job.status, await vm.jobs()

    assert run_async(main()) == ("concluded", [])
    assert same(src, dst)
