"""What is left, and what errors point to, after QEMU or its controller dies
(issue 10): the compat shim's temp dirs are swept like vmpilot's own; a
crash message never points at a file that cleanup already deleted; the
compat shim escapes what it puts in option strings; compat owns QEMU through
the same `QemuProcess` as Machine."""

from __future__ import annotations

import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QEMU

from vmpilot import AbnormalShutdown, AsyncMachine, Machine
from vmpilot.compat.machine import QEMUMachine

NONE = ["-machine", "none", "-nodefaults"]

# launches a compat QEMUMachine, prints its temp dir, waits to be killed
COMPAT_CONTROLLER = r"""
import signal, sys
from vmpilot.compat.machine import QEMUMachine
vm = QEMUMachine(sys.argv[1], ["-machine", "none", "-nodefaults"], base_temp_dir=sys.argv[2])
vm.launch()
print(vm.temp_dir, flush=True)
signal.pause()
"""


def _kill_controller_after_launch(base: Path) -> str:
    ctl = subprocess.Popen(
        [sys.executable, "-c", COMPAT_CONTROLLER, QEMU, str(base)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert ctl.stdout is not None
        ready, _, _ = select.select([ctl.stdout], [], [], 30)
        assert ready, "the controller did not launch in 30 s"
        temp_dir = ctl.stdout.readline().strip()
    finally:
        ctl.kill()  # SIGKILL: no cleanup of any kind runs
        ctl.wait(30)
        assert ctl.stdout is not None
        ctl.stdout.close()
    return temp_dir


def test_a_killed_compat_controllers_temp_dir_is_swept(tmp_path: Path) -> None:
    stale = _kill_controller_after_launch(tmp_path)
    assert os.path.isdir(stale)  # SIGKILL left it, as it leaves Machine's
    with QEMUMachine(QEMU, NONE, base_temp_dir=str(tmp_path)) as vm:
        vm.launch()  # the next compat VM in that base sweeps it
        assert not os.path.exists(stale)
        mine = vm.temp_dir
    assert not os.path.exists(mine) and os.listdir(tmp_path) == []


def test_the_one_sweeper_leaves_live_controllers_dirs(tmp_path: Path) -> None:
    from vmpilot.machine.tempdirs import sweep_stale_dirs

    with QEMUMachine(QEMU, NONE, base_temp_dir=str(tmp_path)) as vm:
        vm.launch()
        live = tmp_path / f"vmpilot-{os.getppid()}-qemu-machine-x"  # our parent is alive
        live.mkdir()
        dead = _kill_controller_after_launch(tmp_path)
        assert sweep_stale_dirs(str(tmp_path), force=True) == [dead]
        assert live.is_dir() and os.path.isdir(vm.temp_dir)
        live.rmdir()


def _paths(text: str) -> list[str]:
    return re.findall(r"(/\S*qemu\.log)", text)


@pytest.mark.parametrize("keep_logs", [False, True])
def test_a_crash_message_points_only_at_files_that_exist(
    keep_logs: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vmpilot.machine")
    log_dir = str(tmp_path) if keep_logs else None
    vm = Machine(machine="none", accel="tcg", memory=32, qemu=QEMU, log_dir=log_dir).launch()
    os.kill(vm.pid, signal.SIGSEGV)  # type: ignore[arg-type]
    with pytest.raises(AbnormalShutdown, match="crashed.*SIGSEGV") as err:
        vm.wait(timeout=30)
    warnings = [r.getMessage() for r in caplog.records if "did not send" in r.getMessage()]
    assert len(warnings) == 1 and "SIGSEGV" in warnings[0]
    pointed = _paths(warnings[0]) + _paths(str(err.value))
    for path in pointed:
        assert os.path.exists(path), f"the message points at {path}, which is gone"
    assert bool(pointed) == keep_logs  # a kept log is pointed at, a deleted one never


def test_compat_uses_the_same_process_owner_and_reports_a_crash_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from vmpilot.machine.process import QemuProcess

    caplog.set_level(logging.WARNING)
    vm = QEMUMachine(QEMU, NONE, base_temp_dir=str(tmp_path))
    vm.launch()
    assert isinstance(vm._process, QemuProcess) and vm._popen is vm._process.proc
    pid = vm.get_pid()
    assert pid is not None
    os.kill(pid, signal.SIGABRT)
    vm.wait(timeout=10)  # in-tree's way to end a VM that exits by itself
    assert vm.exitcode() == -signal.SIGABRT and vm._process.pidfd == -1
    crashes = [r.getMessage() for r in caplog.records if "SIGABRT" in r.getMessage()]
    assert len(crashes) == 1 and "-machine none" in crashes[0]


def test_compat_hard_shutdown_is_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with QEMUMachine(QEMU, NONE, base_temp_dir=str(tmp_path)) as vm:
        vm.launch()
        vm.shutdown(hard=True)
    assert vm.exitcode() == -signal.SIGKILL
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_compat_escapes_its_option_strings(tmp_path: Path) -> None:
    sock = tmp_path / "mon,wait=on.sock"  # a `,` that unescaped would start a new option
    vm = QEMUMachine(QEMU, NONE, base_temp_dir=str(tmp_path), monitor_address=str(sock))
    vm.add_fd(0, 1, "opaque,with=comma")
    args = vm._base_args + vm.args
    assert f"socket,id=mon,path={str(sock).replace(',', ',,')}" in args
    assert "fd=0,set=1,opaque=opaque,,with=comma" in args
    vm.set_console("isa-serial,evil=on")
    vm._console_pair = pair = socket.socketpair()
    try:
        assert "isa-serial,,evil=on,chardev=console" in vm._base_args
    finally:
        for s in pair:
            s.close()
        vm._console_pair = None


def test_compat_launches_with_an_escaped_monitor_path(tmp_path: Path) -> None:
    sock = tmp_path / "a,b.sock"
    with QEMUMachine(QEMU, NONE, base_temp_dir=str(tmp_path), monitor_address=str(sock)) as vm:
        vm.launch()
        assert vm.command("query-status")["status"] in ("prelaunch", "running")
    assert not sock.exists()


async def _async_crash_warning(caplog: pytest.LogCaptureFixture) -> list[str]:
    vm = await AsyncMachine(machine="none", accel="tcg", memory=32, qemu=QEMU).launch()
    os.kill(vm.pid, signal.SIGSEGV)  # type: ignore[arg-type]
    with pytest.raises(AbnormalShutdown):
        await vm.wait(timeout=30)
    return [r.getMessage() for r in caplog.records if "did not send" in r.getMessage()]


def test_async_crash_message_points_at_nothing_deleted(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    caplog.set_level(logging.WARNING, logger="vmpilot.machine")
    warnings = asyncio.run(_async_crash_warning(caplog))
    assert len(warnings) == 1
    assert all(os.path.exists(p) for p in _paths(warnings[0]))
