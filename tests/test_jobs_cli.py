"""`vmpilot job`: a backup run from the command line against a VM's exposed
QMP socket, with its progress bar; a failing job exits 1 with QEMU's text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_jobs_storage import img, same, write

from vmpilot.cli.job_cmd import Bar
from vmpilot.pytest_plugin import VMFactory


def vmpilot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmpilot", *args], capture_output=True, text=True, timeout=120
    )


def test_job_runs_a_backup_with_a_progress_bar(vm_factory: VMFactory, tmp_path: Path) -> None:
    src, dst = img(tmp_path / "src.qcow2"), img(tmp_path / "dst.qcow2")
    write(src, 0x42, "0", "4M")
    vm = vm_factory(machine="none", memory=32, expose_qmp=True)
    for name, path in (("src", src), ("dst", dst)):
        vm.execute("blockdev-add", {"driver": "qcow2", "node-name": name,
                                    "file": {"driver": "file", "filename": path}})  # fmt: skip
    assert vm.qmp_path is not None
    r = vmpilot("job", vm.qmp_path, "blockdev-backup", "device=src", "target=dst", "sync=full",
                "speed=4194304", "job-id=cli", "--progress=always")  # fmt: skip
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert (job["id"], job["type"], job["status"], job["error"]) == ("cli", "backup",
                                                                      "concluded", None)  # fmt: skip
    assert "blockdev-backup [" in r.stderr and "100%" in r.stderr and "16.0 MiB" in r.stderr
    vm.execute("blockdev-del", {"node-name": "dst"})
    assert same(src, dst)
    r = vmpilot("job", vm.qmp_path, "blockdev-backup", "device=src", "target=nowhere",
                "sync=full")  # fmt: skip
    assert r.returncode == 1 and "nowhere" in r.stderr and "Traceback" not in r.stderr
    vm.shutdown()


def test_bar_draws_in_place(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with out.open("w") as f:
        bar = Bar(f, "mirror")
        bar(0, 100 << 20)
        bar(50 << 20, 100 << 20)
        bar.end()
    text = out.read_bytes().decode()
    assert text.count("\r\x1b[K") == 2 and text.endswith("\n")
    assert "[###############...............]  50%  50.0 of 100.0 MiB" in text
