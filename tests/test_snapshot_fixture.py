"""`snapshot_vm`: a fresh guest per test by snapshot revert. The mechanism
(`FreshVM`) directly, then the fixture as users run it: a pytester session
under pytest-xdist (`-n 2`) whose tests each break the guest differently and
each check that nothing another test did is left."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import QEMU

from vmpilot.snapshot_fixture import FreshVM

ARGS = ["-p", "no:cacheprovider", f"--vmpilot-qemu={QEMU}", "--vmpilot-accel=tcg"]


def test_revert_undoes_files_a_hung_shell_and_a_dead_vm(linux_guest: Any) -> None:
    fresh = FreshVM(linux_guest.config(qemu=QEMU, accel="tcg"))
    try:
        vm = fresh.fresh()
        assert (fresh.boots, fresh.reverts) == (1, 0)
        vm.shell.check("echo dirty > /tmp/left-behind")
        assert fresh.fresh() is vm and fresh.reverts == 1  # reverted, not rebooted
        assert vm.shell.check("ls /tmp") == ""
        vm.console.send("sleep 100000\n")  # the shell is busy for good
        assert fresh.fresh() is vm and fresh.boots == 1
        assert vm.shell.check("echo back") == "back\n"
        pid = vm.pid
        vm.kill()  # a test that killed QEMU
        again = fresh.fresh()
        assert fresh.boots == 2 and again.pid != pid
        assert again.shell.check("echo alive") == "alive\n"
    finally:
        fresh.close()
    assert again.state == "stopped"


BROKEN = """
import json, os

def record(snapshot_vm, vmpilot_fresh_vm, name):
    # nothing another test did is here: no marker, a shell that answers
    assert snapshot_vm.shell.check("ls /tmp", timeout=30) == ""
    snapshot_vm.shell.check(f"touch /tmp/{name}")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(f"{name}.json", "w") as f:
        json.dump({"worker": worker, "boots": vmpilot_fresh_vm.boots,
                   "reverts": vmpilot_fresh_vm.reverts}, f)

def test_writes_a_file(snapshot_vm, vmpilot_fresh_vm):
    record(snapshot_vm, vmpilot_fresh_vm, "writes")

def test_kills_its_shell(snapshot_vm, vmpilot_fresh_vm):
    record(snapshot_vm, vmpilot_fresh_vm, "shell")
    snapshot_vm.console.send("kill -9 $$\\n")

def test_hangs_its_shell(snapshot_vm, vmpilot_fresh_vm):
    record(snapshot_vm, vmpilot_fresh_vm, "hangs")
    snapshot_vm.console.send("sleep 100000\\n")

def test_kills_the_vm(snapshot_vm, vmpilot_fresh_vm):
    record(snapshot_vm, vmpilot_fresh_vm, "kills")
    snapshot_vm.kill()

def test_panics_the_kernel(snapshot_vm, vmpilot_fresh_vm):
    record(snapshot_vm, vmpilot_fresh_vm, "panics")
    snapshot_vm.console.send("echo c > /proc/sysrq-trigger\\n")

def test_pauses_the_vm(snapshot_vm, vmpilot_fresh_vm):
    record(snapshot_vm, vmpilot_fresh_vm, "pauses")
    snapshot_vm.execute("stop")
"""


def test_the_fixture_under_xdist_isolates_tests(
    pytester: pytest.Pytester, linux_guest: Any
) -> None:
    pytester.makepyfile(BROKEN)
    result = pytester.runpytest_subprocess(*ARGS, "-n", "2")
    result.assert_outcomes(passed=6)
    runs = [json.loads(p.read_text()) for p in pytester.path.glob("*.json")]
    assert len(runs) == 6 and {r["worker"] for r in runs} == {"gw0", "gw1"}
    # each worker booted once, and again only after a test left its VM dead
    # (killed, or a panic: the bundled guest does not reboot); all else reverted
    assert sum(r["reverts"] for r in runs) >= 2
    for worker in ("gw0", "gw1"):
        boots = sorted(r["boots"] for r in runs if r["worker"] == worker)
        assert boots[0] == 1 and boots[-1] <= 3
