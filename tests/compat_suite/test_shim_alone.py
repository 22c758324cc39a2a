"""What QEMU 7.2 to 10.x iotests and functional tests import and call beyond
qemu.machine: qemu.utils, qemu.qmp.qmp_client, and `cmd()` of both eras
(QEMU 8.2+'s `cmd(name, {args})` with the arguments dict as the second
positional parameter; the older `command(name, conv_keys, **args)`). Run with
vmpilot's shim alone on PYTHONPATH: QEMU's python/ tree is never importable."""

import os
import subprocess
import sys

import pytest
from conftest import QEMU
from qemu.machine import QEMUMachine
from qemu.qmp.qmp_client import ExecuteError
from qemu.utils import (
    VerboseProcessError,
    add_visual_margin,
    get_info_usernet_hostfwd_port,
    kvm_available,
    tcg_available,
)
from qemu.utils.accel import list_accel

SHIM_ROOT = os.environ["VMPILOT_SHIM"]


def test_every_qemu_module_comes_from_the_shim():
    # iotests.py and the functional tests' qemu_test import these
    import qemu.machine.machine
    import qemu.machine.qtest
    import qemu.qmp
    import qemu.qmp.legacy
    import qemu.utils  # noqa: F401

    # `qemu` itself is a namespace package (so is QEMU's): every module in it is the shim's
    loaded = {n: m for n, m in sys.modules.items() if n.startswith("qemu.")}
    assert "qemu.utils" in loaded and "qemu.qmp.qmp_client" in loaded
    for name, module in loaded.items():
        assert module.__file__.startswith(SHIM_ROOT + os.sep), (name, module.__file__)


def test_what_the_shim_does_not_provide_says_so():
    with pytest.raises(ImportError, match="not provided by the vmpilot"):
        from qemu.qmp.qmp_client import QMPClient  # noqa: F401


def test_accelerator_probes_ask_the_binary():
    accels = list_accel(QEMU)
    assert "tcg" in accels and accels == [a.strip() for a in accels]
    assert tcg_available(QEMU) is True
    assert kvm_available("no-such-arch") is False  # never runs a foreign target
    assert kvm_available(qemu_bin=QEMU) == (
        os.access("/dev/kvm", os.R_OK | os.W_OK) and "kvm" in accels
    )


def _has_user_networking():
    out = subprocess.run([QEMU, "-netdev", "help"], capture_output=True, text=True, timeout=60)
    return "user" in out.stdout.split()


@pytest.mark.skipif(not _has_user_networking(), reason="QEMU without user networking (slirp)")
def test_usernet_hostfwd_port_from_real_hmp_output(workdir):
    with QEMUMachine(QEMU, base_temp_dir=workdir) as vm:
        vm.set_machine("none")
        vm.add_args("-nodefaults", "-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:0-:22")
        vm.launch()
        text = vm.cmd("human-monitor-command", command_line="info usernet")
    port = get_info_usernet_hostfwd_port(text)
    assert isinstance(port, int) and 0 < port < 65536
    assert get_info_usernet_hostfwd_port("Hub -1 (n0):\r\n  no forwarding\r\n") is None


def test_verbose_process_error_shows_the_output():
    with pytest.raises(VerboseProcessError) as info:
        try:
            subprocess.run([QEMU, "-no-such-option"], capture_output=True, text=True, check=True)
        except subprocess.CalledProcessError as exc:
            raise VerboseProcessError(exc.returncode, exc.cmd, exc.stdout, exc.stderr) from exc
    text = str(info.value)
    assert text.startswith(info.value.summary()) and "non-zero exit status 1" in text
    assert "stdout: N/A" in text and "┏━ stderr " in text and "invalid option" in text
    combined = str(VerboseProcessError(2, ["x"], output="both streams\n"))
    assert "┏━ output " in combined and "┃ both streams" in combined and "stderr" not in combined


def test_add_visual_margin_layout():
    box = add_visual_margin("one two three four", width=12, name="T", padding=1)
    lines = box.split(os.linesep)
    assert lines[0] == "┏━ T ━━━━━━━" and lines[-1] == "┗━━━━━━━━━━━"
    assert lines[1:-1] == ["┃ one two", "┃ three", "┃ four"]  # wrapped inside the padding
    assert all(len(line) <= 12 for line in lines)


def test_cmd_takes_an_arguments_dict_as_qemu_10_does(workdir):
    with QEMUMachine(QEMU, base_temp_dir=workdir) as vm:
        vm.set_machine("none")
        vm.launch()
        # a dict goes as given: no '_' to '-' conversion (node-name has a '_' here)
        assert vm.cmd("blockdev-add", {"driver": "null-co", "node-name": "n_1", "size": 4096}) == {}
        names = [n["node-name"] for n in vm.cmd("query-named-block-nodes")]
        assert names == ["n_1"]
        assert vm.cmd("query-named-block-nodes", {"flat": True})[0]["node-name"] == "n_1"
        # keyword arguments are converted, as before
        vm.cmd("blockdev-add", driver="null-co", node_name="n2")
        assert vm.qmp("blockdev-del", {"node-name": "n2"}) == {"return": {}}
        with pytest.raises(ValueError):
            vm.cmd("blockdev-del", {"node-name": "n_1"}, node_name="n_1")
        with pytest.raises(ExecuteError) as info:
            vm.cmd("blockdev-del", {"node-name": "nope"})
        err = info.value
        assert err.error_class == "GenericError" and err.error.error.class_ == "GenericError"
        assert err.sent == {"execute": "blockdev-del", "arguments": {"node-name": "nope"}}
        assert err.received["error"]["desc"] == err.error.error.desc


def test_command_of_qemu_before_8_2_keeps_conv_keys_positional(workdir):
    with QEMUMachine(QEMU, base_temp_dir=workdir) as vm:
        vm.set_machine("none")
        vm.launch()
        assert vm.command("blockdev-add", driver="null-co", node_name="a1") == {}
        # conv_keys=False (second positional): keys go as written
        assert vm.command("blockdev-add", False, driver="null-co", **{"node-name": "a2"}) == {}
        with pytest.raises(ExecuteError):  # not converted: QEMU rejects node_name
            vm.command("blockdev-add", False, driver="null-co", node_name="a3")
        names = sorted(n["node-name"] for n in vm.command("query-named-block-nodes"))
        assert names == ["a1", "a2"]
        vm.cmd("quit")
        vm.wait()
    assert vm.exitcode() == 0
