"""Machine: launch, the shutdown contract and nothing left behind, against
real QEMU (-machine none)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import QEMU, wait_until
from kernel_wait import blocked_reading

from vmpilot import (
    AbnormalShutdown,
    ConfigError,
    Disconnected,
    Drive,
    LaunchError,
    Machine,
    MachineConfig,
)
from vmpilot.machine.lifecycle import sweep_stale_dirs


def none_vm(**kw: object) -> Machine:
    return Machine(machine="none", memory=32, qemu=QEMU, **kw)  # type: ignore[arg-type]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_quit_ok_and_cleanup() -> None:
    vm = none_vm(name="quit-ok")
    assert vm.state == "new"
    vm.launch()
    assert vm.state == "running" and vm.pid and vm.accel in ("tcg", "kvm") and vm.accel_reason
    tmp = vm.temp_dir
    assert tmp and os.stat(tmp).st_mode & 0o777 == 0o700
    assert "-machine" in vm.argv and vm.execute("query-status")["running"]
    vm.shutdown()
    assert vm.state == "stopped" and vm.exit_code == 0 and vm.exit_signal is None
    assert not vm.crashed and not os.path.exists(tmp) and gone(vm.pid)
    vm.shutdown()  # no-ops on a stopped VM
    vm.wait()
    vm.kill()


def test_sigstopped_qemu_shutdown_times_out_abnormal() -> None:
    vm = none_vm().launch()
    tmp, pid = vm.temp_dir, vm.pid
    assert pid is not None and tmp is not None
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(AbnormalShutdown, match="quit.*failed|did not exit") as info:
        vm.shutdown(timeout=1)
    assert time.monotonic() - t0 < 5
    assert info.value.__cause__ is not None
    assert vm.state == "stopped" and vm.exit_signal == signal.SIGKILL and not vm.crashed
    assert gone(pid) and not os.path.exists(tmp)


def test_segv_while_execute_blocked() -> None:
    vm = none_vm().launch()
    pid = vm.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            vm.execute("query-status", timeout=30)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=call)
    t.start()
    wait_until(lambda: blocked_reading(t), what="execute waiting for its reply")
    os.kill(pid, signal.SIGSEGV)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGCONT)
    t.join(5)
    assert time.monotonic() - t0 < 1
    assert len(errors) == 1 and isinstance(errors[0], Disconnected)
    # noticed without being asked
    wait_until(lambda: vm.state == "stopped", what="the watcher to notice")
    assert vm.crashed and vm.exit_signal == signal.SIGSEGV
    with pytest.raises(AbnormalShutdown, match="crashed.*SIGSEGV"):
        vm.shutdown()
    vm.shutdown()  # reported once; then a no-op


def test_bad_option_launch_error_has_qemu_message() -> None:
    vm = none_vm(extra_args=["-no-such-option"])
    with pytest.raises(LaunchError) as info:
        vm.launch()
    err = info.value
    assert "invalid option" in err.log and "invalid option" in str(err)
    assert err.exit_code == 1 and "-no-such-option" in err.argv
    assert vm.state == "failed" and vm.temp_dir is None
    assert "invalid option" in vm.log  # still there after cleanup


def test_missing_binary() -> None:
    with pytest.raises(LaunchError, match="not found.*VMPILOT_QEMU"):
        Machine(machine="none", qemu="qemu-system-nonexistent").launch()


def test_launch_timeout_when_qemu_never_greets(tmp_path: Path) -> None:
    fake = tmp_path / "fake-qemu"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    vm = Machine(machine="none", qemu=str(fake))
    with pytest.raises(LaunchError, match="no QMP greeting within 0.3 s") as info:
        vm.launch(timeout=0.3)
    assert info.value.exit_signal == signal.SIGKILL
    assert vm.pid is not None and gone(vm.pid)


def test_wait_times_out_then_kills() -> None:
    vm = none_vm().launch()
    pid = vm.pid
    assert pid is not None
    with pytest.raises(AbnormalShutdown, match="did not exit by itself within 0.5 s"):
        vm.wait(timeout=0.5)
    assert gone(pid) and vm.state == "stopped"


def test_wait_returns_when_vm_exits_by_itself() -> None:
    vm = none_vm().launch()
    vm.qmp.execute("quit")  # something else makes it exit; wait() sends nothing
    assert vm.wait(timeout=10) == 0


def test_exception_in_with_kills_and_propagates() -> None:
    with pytest.raises(KeyError, match="boom"):
        with none_vm() as vm:
            pid = vm.pid
            raise KeyError("boom")
    assert vm.state == "stopped" and vm.exit_signal == signal.SIGKILL and not vm.crashed
    assert pid is not None and gone(pid)


def test_controller_sigkilled_qemu_dies() -> None:
    code = textwrap.dedent(
        f"""
        import sys, threading
        from vmpilot import Machine
        vm = Machine(machine="none", memory=32, qemu={QEMU!r}).launch()
        # launched from a worker thread too: the death signal must still hold
        box = []
        t = threading.Thread(target=lambda: box.append(
            Machine(machine="none", memory=32, qemu={QEMU!r}).launch()))
        t.start(); t.join()
        print(vm.pid, box[0].pid, flush=True)
        sys.stdin.read()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        pids = [int(p) for p in child.stdout.readline().split()]
        assert len(pids) == 2
        pidfds = [os.pidfd_open(p) for p in pids]
        try:
            child.kill()
            child.wait(5)
            t0 = time.monotonic()
            for fd in pidfds:
                r, _, _ = select.select([fd], [], [], max(0.0, 1 - (time.monotonic() - t0)))
                assert r, "QEMU outlived its controller by more than 1 s"
            # its temp dirs could not be removed by a SIGKILLed process; the next
            # controller sweeps them
            stale = sweep_stale_dirs(force=True)
            assert len([d for d in stale if f"vmpilot-{child.pid}-" in d]) == 2
        finally:
            for fd in pidfds:
                os.close(fd)
    finally:
        child.kill()
        child.wait()
        for stream in (child.stdin, child.stdout):
            if stream:
                stream.close()


def test_external_kill_is_noticed_and_reported_as_crash() -> None:
    vm = none_vm().launch()
    assert vm.pid is not None
    os.kill(vm.pid, signal.SIGKILL)  # not sent by vmpilot
    with pytest.raises(AbnormalShutdown, match="crashed.*SIGKILL"):
        vm.wait(timeout=10)
    assert vm.crashed and vm.state == "stopped"


def test_comma_in_drive_path_cannot_inject(tmp_path: Path) -> None:
    image = tmp_path / "a,b=c,readonly=on.img"
    image.write_bytes(b"\0" * 65536)
    with none_vm(drives=[Drive(image, interface="none", id="d0")]) as vm:
        [blk] = [b for b in vm.execute("query-block") if b["device"] == "d0"]
        assert blk["inserted"]["file"] == str(image)
        assert blk["inserted"]["ro"] is False  # "readonly=on" stayed part of the name


def test_config_refused_before_qemu_runs(tmp_path: Path) -> None:
    cases = [
        ({"kernel": tmp_path / "nope"}, "kernel file .* does not exist"),
        ({"memory": "lots"}, "memory 'lots'"),
        ({"cpus": 0}, "cpus must be a positive int"),
        ({"accel": "warp"}, "accel 'warp'"),
        ({"machine": "pc,accel=kvm"}, "invalid machine type"),
        ({"drives": [Drive(tmp_path / "missing.img")]}, "drive file"),
        ({"extra_args": "-S"}, "list of arguments"),
        ({"devices": [{"id": "x"}]}, "needs a 'driver' key"),
    ]
    for kw, match in cases:
        vm = Machine(MachineConfig(machine="none", qemu=QEMU), **kw)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match=match):
            vm.launch()
        assert vm.state == "failed" and vm.pid is None


def test_device_mapping_is_escaped() -> None:
    argv = MachineConfig(devices=[{"driver": "virtio-rng-pci", "id": "a,b"}]).to_argv("tcg")
    assert argv[argv.index("-device") + 1] == "virtio-rng-pci,id=a,,b"


def test_accel_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMPILOT_ACCEL", "tcg")
    with none_vm() as vm:
        assert vm.accel == "tcg" and vm.accel_reason == "VMPILOT_ACCEL"
        assert vm.argv[vm.argv.index("-accel") + 1] == "accel=tcg"
    monkeypatch.setenv("VMPILOT_ACCEL", "bogus")
    with pytest.raises(ConfigError, match="VMPILOT_ACCEL"):
        none_vm().launch()


def test_launch_twice_refused() -> None:
    with none_vm() as vm, pytest.raises(LaunchError, match="launched once"):
        vm.launch()


def _census() -> tuple[int, int, int]:
    fds = len(os.listdir("/proc/self/fd"))
    children = len(Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split())
    # the test run's private temp root (see conftest): only this run's dirs are there
    tmp = len([n for n in os.listdir(tempfile.gettempdir()) if n.startswith("vmpilot-")])
    return fds, children, tmp


def test_200_cycles_leave_nothing() -> None:
    with none_vm() as vm:  # warm up (libc loaded, spawner ready)
        vm.execute("query-status")
    before = _census()
    for _ in range(200):
        with none_vm() as vm:
            vm.execute("query-status")
    assert _census() == before
    assert threading.active_count() < 10


def test_shutdown_after_quit_sent_elsewhere_is_graceful() -> None:
    vm = none_vm().launch()
    vm.qmp.execute("quit")  # e.g. a test that sent quit itself
    vm.shutdown(timeout=10)  # QEMU is exiting anyway: no AbnormalShutdown
    assert vm.exit_code == 0 and vm.state == "stopped"
