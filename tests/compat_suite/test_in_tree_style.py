"""Written the way QEMU's iotests and functional tests use qemu.machine and
qemu.qmp.legacy, with both eras' API. Runs with vmpilot's shim first on
PYTHONPATH. Against QEMU 7.2's own library 9 of 15 pass: the others use 8.x+
API (`cmd`), relaunch a machine, read the console's first bytes (7.2 loses
output written before its console socket connects) or rely on vmpilot's
guarantees (7.2 hangs on a SIGSTOPped QEMU and on one that dies before QMP
connects)."""

import os
import signal

import pytest
from conftest import HAS_QTEST, QEMU
from qemu.machine import QEMUMachine
from qemu.machine.machine import AbnormalShutdown, QEMUMachineError, VMLaunchFailure
from qemu.machine.qtest import QEMUQtestMachine
from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol


class VM(QEMUMachine):
    """An iotests-style subclass: extra base args and hooks."""

    def __init__(self, workdir, **kwargs):
        super().__init__(QEMU, base_temp_dir=workdir, **kwargs)
        self.calls = []

    @property
    def _base_args(self):
        return super()._base_args + ["-nodefaults", "-no-user-config"]

    def _pre_launch(self):
        self.calls.append("pre")
        super()._pre_launch()

    def _post_launch(self):
        super()._post_launch()
        self.calls.append("post")

    def _post_shutdown(self):
        super()._post_shutdown()
        self.calls.append("shutdown")


def test_launch_qmp_command_cmd_hmp_shutdown(workdir):
    vm = VM(workdir, name="basic")
    vm.set_machine("none")
    vm.add_args("-m", "32")
    vm.launch()
    assert vm.is_running() and vm.get_pid() > 0
    assert vm.calls == ["pre", "post"]
    assert "-nodefaults" in vm._qemu_full_args and "-machine" in vm._qemu_full_args
    assert vm.qmp("query-status")["return"]["status"] == "running"
    assert vm.qmp("query-status", args_dict={})["return"]["running"] is True
    assert "error" in vm.qmp("device_del", id="nope")
    assert vm.command("query-name") == {}
    assert vm.cmd("query-kvm")["enabled"] in (True, False)
    with pytest.raises(ExecuteError):
        vm.cmd("device_del", id="nope")
    assert vm.hmp("info status")["return"].startswith("VM status: running")
    assert os.path.isdir(vm.temp_dir) and vm.log_dir == vm.temp_dir and vm.sock_dir == vm.temp_dir
    temp = vm.temp_dir
    vm.shutdown()
    assert vm.exitcode() == 0 and not vm.is_running() and vm.get_pid() is None
    assert vm.calls[-1] == "shutdown" and not os.path.exists(temp)
    vm.shutdown()  # nothing to do


def test_events_wait_match_and_queues(workdir):
    with VM(workdir) as vm:
        vm.set_machine("none")
        vm.launch()
        vm.command("stop")
        vm.command("cont")
        ev = vm.event_wait("RESUME", timeout=5)
        assert ev["event"] == "RESUME" and set(ev["timestamp"]) == {"seconds", "microseconds"}
        assert vm.get_qmp_events(wait=False)[0]["event"] == "STOP"  # queued while waiting
        vm.command("stop")
        assert vm.event_wait("STOP", timeout=5, match=None)
        assert vm.event_wait("STOP", timeout=0) is None
        vm.qmp("quit")
        shutdown = vm.events_wait([("SHUTDOWN", {"data": {"reason": "host-qmp-quit"}})], 5)
        assert shutdown["data"]["guest"] is False
    assert vm.exitcode() == 0


def test_event_match_semantics():
    m = QEMUMachine.event_match
    assert m({"foo": {"bar": 1}}, {"foo": None})
    assert m({"foo": {"bar": 1, "rab": 2}}, {"foo": {"rab": 2}})
    assert not m({"foo": {"bar": 1}}, {"foo": {"abc": None}})
    assert m({"a": 1}, None)


def test_event_wait_timeout_raises(workdir):
    with VM(workdir) as vm:
        vm.set_machine("none")
        vm.launch()
        with pytest.raises(TimeoutError):
            vm.event_wait("BLOCK_JOB_COMPLETED", timeout=0.2)


def test_hard_shutdown_and_kill(workdir):
    vm = VM(workdir)
    vm.set_machine("none")
    vm.launch()
    vm.shutdown(hard=True)
    assert vm.exitcode() == -signal.SIGKILL
    vm.launch()  # a machine can be launched again
    vm.kill()
    assert vm.exitcode() == -signal.SIGKILL


def test_graceful_shutdown_failure_is_abnormal(workdir):
    vm = VM(workdir)
    vm.set_machine("none")
    vm.launch()
    pid = vm.get_pid()
    os.kill(pid, signal.SIGSTOP)
    with pytest.raises(AbnormalShutdown):
        vm.shutdown(timeout=1)
    assert vm.exitcode() == -signal.SIGKILL and not os.path.exists(f"/proc/{pid}/status")


def test_launch_failure_attributes_and_log(workdir):
    vm = VM(workdir)
    vm.add_args("-no-such-option")
    with pytest.raises(VMLaunchFailure) as info:
        vm.launch()
    err = info.value
    assert err.exitcode == 1 and "-no-such-option" in err.command
    assert "invalid option" in err.output and "invalid option" in vm.get_log()
    assert "Exit code: 1" in str(err)
    assert isinstance(err, QEMUMachineError)


def test_launch_twice_is_an_error(workdir):
    with VM(workdir) as vm:
        vm.set_machine("none")
        vm.launch()
        with pytest.raises(QEMUMachineError, match="already launched"):
            vm.launch()


def test_wait_after_guest_initiated_exit_and_console(workdir, tiny_bios):
    log = os.path.join(workdir, "console.log")
    vm = VM(workdir, console_log=log)
    vm.set_machine("q35")
    vm.set_console()
    vm.add_args("-bios", tiny_bios, "-device", "isa-debug-exit,iobase=0xf4,iosize=4")
    vm.launch()
    console = vm.console_socket.makefile("rb")
    assert console.readline().startswith(b"TINY-GUEST READY")
    vm.console_socket.sendall(b"~\x05")  # the guest asks QEMU to exit with (5<<1)|1
    vm.wait()
    console.close()
    assert vm.exitcode() == 11
    assert open(log, "rb").read().startswith(b"TINY-GUEST READY")


def test_add_fd_and_send_fd_scm(workdir):
    image = os.path.join(workdir, "disk.img")
    with open(image, "wb") as f:
        f.truncate(65536)
    fd = os.open(image, os.O_RDWR)
    try:
        with VM(workdir) as vm:
            vm.set_machine("none")
            vm.add_fd(fd, 1, "disk")
            vm.launch()
            vm.qmp("blockdev-add", driver="file", node_name="f", filename="/dev/fdset/1")
            assert vm.qmp("query-named-block-nodes")["return"][0]["node-name"] == "f"
            r, w = os.pipe()
            vm.send_fd_scm(fd=w)
            assert vm.qmp("getfd", fdname="pipe") == {"return": {}}
            vm.send_fd_scm(file_path=image)
            assert vm.qmp("getfd", fdname="file") == {"return": {}}
            os.close(r)
            os.close(w)
    finally:
        os.close(fd)


def test_legacy_protocol_against_a_qmp_socket(workdir):
    path = os.path.join(workdir, "qmp.sock")
    with VM(workdir) as vm:
        vm.set_machine("none")
        vm.add_args("-qmp", f"unix:{path},server=on,wait=off")
        vm.launch()
        qmp = QEMUMonitorProtocol(QEMUMonitorProtocol.parse_address(path))
        greeting = qmp.connect()
        assert greeting["QMP"]["version"]["qemu"]["major"] >= 7
        assert qmp.cmd_raw("query-status")["return"]["running"]
        assert qmp.cmd_obj({"execute": "query-name", "id": "mine"}) == {"return": {}, "id": "mine"}
        assert qmp.cmd("query-name") == {}  # QEMU >= 8.2 meaning
        assert qmp.cmd("query-name", args=None) == {"return": {}}  # older meaning
        assert "error" in qmp.cmd_raw("device_del", {"id": "nope"})
        with pytest.raises(ExecuteError):
            qmp.cmd("device_del", id="nope")
        qmp.settimeout(5)  # an int is honoured
        assert qmp.pull_event(wait=False) is None
        qmp.cmd("stop")
        assert qmp.pull_event(wait=2)["event"] == "STOP"  # an int wait is a timeout, not forever
        with pytest.raises(TimeoutError):
            qmp.pull_event(wait=1)
        qmp.cmd("cont")
        assert [e["event"] for e in qmp.get_events(wait=True)] == ["RESUME"]
        qmp.clear_events()
        qmp.close()


def test_monitor_address_server_mode(workdir):
    path = os.path.join(workdir, "mon.sock")
    with VM(workdir, monitor_address=path) as vm:
        vm.set_machine("none")
        vm.launch()
        assert vm.qmp("query-status")["return"]["running"]
    assert not os.path.exists(path)


def test_qmp_timer_and_constructor_arguments_of_both_eras(workdir):
    vm = QEMUMachine(
        QEMU,
        args=["-machine", "none", "-nodefaults"],
        wrapper=[],
        name="eras",
        base_temp_dir=workdir,
        sock_dir=workdir,
        drain_console=False,
        console_log=None,
        log_dir=workdir,
        qmp_timer=10.0,
    )
    vm.launch()
    assert vm.get_log() is None  # only after shutdown
    vm.shutdown()
    assert vm.get_log() == ""
    assert os.path.exists(os.path.join(workdir, "eras.log"))


@pytest.mark.skipif(not HAS_QTEST, reason="QEMU without the qtest accelerator")
def test_qtest_machine(workdir):
    with QEMUQtestMachine(QEMU, ["-machine", "pc"], base_temp_dir=workdir) as vm:
        vm.launch()
        assert vm.qtest("writeb 0x1000 0x5a").startswith("OK")
        assert vm.qtest("readb 0x1000") == "OK 0x000000000000005a\n"  # QEMU's line, as is


def test_context_manager_shuts_down(workdir):
    with VM(workdir) as vm:
        vm.set_machine("none")
        vm.launch()
        pid = vm.get_pid()
    assert vm.exitcode() == 0
    with pytest.raises(OSError):
        os.kill(pid, 0)
