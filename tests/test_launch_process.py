"""The process owner (`QemuProcess`) and its spawn: the parent check after
the death signal is set, the spawner thread, the fallback without setpriv."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import pytest
from conftest import QEMU

from vmpilot import Machine
from vmpilot.machine import process


def test_the_spawned_command_refuses_to_run_once_its_controller_is_gone() -> None:
    if process._setpriv() is None:
        pytest.skip("no setpriv --pdeathsig: the preexec_fn path makes the check")
    # the child's parent is us; told its controller is pid 1, it must not run the payload
    gone = subprocess.run(process.command(["sh", "-c", "exit 7"], parent=1), timeout=30)
    here = subprocess.run(process.command(["sh", "-c", "exit 7"], parent=os.getpid()), timeout=30)
    assert (gone.returncode, here.returncode) == (process.PARENT_GONE, 7)


def test_the_death_signal_is_set_in_qemu() -> None:
    with Machine(machine="none", accel="tcg", memory=32, qemu=QEMU) as vm:
        assert vm.pid is not None
        with open(f"/proc/{vm.pid}/comm") as f:
            assert f.read().startswith("qemu-system")  # the wrappers exec'd away
        with open(f"/proc/{vm.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        assert int(fields[1]) == os.getpid() and int(fields[3]) == vm.pid  # ppid; own group


def test_a_vm_launched_from_a_thread_outlives_that_thread() -> None:
    # PR_SET_PDEATHSIG fires when the forking *thread* exits: the spawner thread forks
    vms: list[Machine] = []
    t = threading.Thread(
        target=lambda: vms.append(
            Machine(machine="none", accel="tcg", memory=32, qemu=QEMU).launch()
        )
    )
    t.start()
    t.join(60)
    assert not t.is_alive() and vms
    vm = vms[0]
    try:
        assert vm.execute("query-status")["status"] in ("prelaunch", "running")
        assert vm.state == "running" and not vm.crashed
    finally:
        vm.shutdown()
    assert vm.exit_code == 0


def test_without_setpriv_the_preexec_path_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "_setpriv", lambda: None)
    with Machine(machine="none", accel="tcg", memory=32, qemu=QEMU) as vm:
        assert vm.execute("query-status")["status"] in ("prelaunch", "running")
    assert vm.exit_code == 0


def test_the_owner_records_who_sent_the_signal() -> None:
    log_fd = os.open(os.devnull, os.O_WRONLY)
    try:
        ours = process.QemuProcess([QEMU, "-machine", "none", "-nodefaults"], [], log_fd)
        theirs = process.QemuProcess([QEMU, "-machine", "none", "-nodefaults"], [], log_fd)
    finally:
        os.close(log_fd)
    ours.kill(signal.SIGTERM)
    os.kill(theirs.pid, signal.SIGABRT)
    # QEMU ends cleanly on SIGTERM, or dies of it if it came before its handler
    assert ours.wait(30) in (0, -signal.SIGTERM) and not ours.crashed
    assert theirs.wait(30) == -signal.SIGABRT and theirs.crashed
    for p in (ours, theirs):
        p.close()
        p.close()  # idempotent
        assert p.pidfd == -1 and p.poll() == p.returncode
