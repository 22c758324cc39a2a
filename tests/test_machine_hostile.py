"""Hostile names and peers against the Machine layer (issue 10, defects 5 and
6): drive file names that look like protocols, `=` and `,` in option values,
a temp dir with a comma, a QEMU that greets with garbage or never answers
`qmp_capabilities`. Real QEMU wherever it can answer; a scripted stand-in
only for what QEMU cannot be made to do (garbage, a missing reply)."""

from __future__ import annotations

import json
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import QEMU, run_async

from vmpilot import AsyncMachine, ConfigError, Drive, LaunchError, Machine, QMPClient


def none_vm(**kw: Any) -> Machine:
    return Machine(machine="none", memory=32, qemu=QEMU, **kw)


def _nodes(vm: Machine) -> list[dict[str, Any]]:
    return list(vm.execute("query-named-block-nodes"))


def test_json_drive_name_is_a_local_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a relative name is where a protocol prefix would be parsed
    (tmp_path / "secret.txt").write_bytes(b"top secret\n" * 100)
    name = 'json:{"driver":"raw","file":{"driver":"file","filename":"secret.txt"}}'
    (tmp_path / name).write_bytes(b"\0" * 65536)
    with none_vm(drives=[Drive(name, interface="none", id="d0")]) as vm:
        nodes = _nodes(vm)
        [blk] = [b for b in vm.execute("query-block") if b["device"] == "d0"]
    assert {n["file"] for n in nodes} == {name}  # nothing else was opened
    assert {n["drv"] for n in nodes} == {"raw", "file"}
    assert blk["inserted"]["image"]["virtual-size"] == 65536  # not secret.txt's 1100 bytes


def test_nbd_drive_name_never_connects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        name = f"nbd:127.0.0.1:{listener.getsockname()[1]}"
        (tmp_path / name).write_bytes(b"\0" * 65536)
        # QEMU opens every drive before it greets: once up, any connection was made
        with none_vm(drives=[Drive(name, interface="none", id="d0")]) as vm:
            nodes = _nodes(vm)
            listener.setblocking(False)
            with pytest.raises(BlockingIOError):
                listener.accept()  # nobody connected to the port named by the file
    assert {n["file"] for n in nodes} == {name} and "nbd" not in {n["drv"] for n in nodes}


def test_drive_name_with_unknown_prefix_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my:disk.img").write_bytes(b"\0" * 65536)
    with none_vm(drives=[Drive("my:disk.img", interface="none", id="d0", readonly=True)]) as vm:
        [blk] = [b for b in vm.execute("query-block") if b["device"] == "d0"]
    assert blk["inserted"]["file"] == "my:disk.img" and blk["inserted"]["ro"] is True


def test_name_with_equals_and_commas_is_carried_whole() -> None:
    hostile = "process=evil,debug-threads=on"
    with none_vm(name=hostile) as vm:
        assert vm.execute("query-name") == {"name": hostile}
        pid = vm.pid
        assert pid is not None
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    assert comm != "evil"  # `-name process=evil` would have renamed QEMU's process


@pytest.mark.parametrize("machine", ["type=none", "none,accel=kvm", "", "none\n"])
def test_machine_type_that_is_not_one_name_is_refused(machine: str) -> None:
    vm = Machine(machine=machine, qemu=QEMU)
    with pytest.raises(ConfigError, match="invalid machine type"):
        vm.launch()
    assert vm.state == "failed" and vm.pid is None


@pytest.mark.parametrize("dirname", ["with,comma", "x,wait=on"])
def test_expose_qmp_under_a_temp_dir_with_a_comma(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dirname: str
) -> None:
    base = tmp_path / dirname
    base.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    with none_vm(expose_qmp=True) as vm:  # `wait=on` injected would stall QEMU's start
        assert vm.qmp_path is not None and vm.qmp_path.startswith(str(base) + "/")
        with QMPClient.connect(vm.qmp_path, connect_timeout=10) as other:
            assert other.execute("query-status")["status"] == "running"


def _fake_qemu(tmp_path: Path, behaviour: str) -> str:
    """A stand-in for QEMU that finds its QMP fd in argv like QEMU does, then
    misbehaves in a way real QEMU cannot be made to."""
    script = tmp_path / "fake-qemu"
    script.write_text(
        f"#!{sys.executable}\n"
        "import os, sys, time\n"
        "spec = next(a for a in sys.argv if a.startswith('socket,id=vmpilot-qmp,fd='))\n"
        "fd = int(spec.rsplit('=', 1)[1])\n"
        f"behaviour = {behaviour!r}\n"
        "if behaviour == 'garbage':\n"
        "    os.write(fd, b'\\x00\\xffthis is not QMP\\n')\n"
        "else:\n"
        f"    os.write(fd, {json.dumps({'QMP': {'version': {}, 'capabilities': []}})!r}"
        ".encode() + b'\\r\\n')\n"
        "    os.read(fd, 4096)  # qmp_capabilities: never answered\n"
        "time.sleep(120)\n"
    )
    script.chmod(0o755)
    return str(script)


def test_garbage_greeting_fails_at_once_with_the_protocol_error(tmp_path: Path) -> None:
    vm = Machine(machine="none", qemu=_fake_qemu(tmp_path, "garbage"))
    started = time.monotonic()
    with pytest.raises(LaunchError, match="malformed QMP instead of a QMP greeting"):
        vm.launch(timeout=60)
    assert time.monotonic() - started < 30  # not the whole 60 s timeout
    assert vm.state == "failed" and vm.exit_signal is not None


def test_garbage_greeting_fails_at_once_async(tmp_path: Path) -> None:
    async def main() -> None:
        vm = AsyncMachine(machine="none", qemu=_fake_qemu(tmp_path, "garbage"))
        with pytest.raises(LaunchError, match="malformed QMP instead of a QMP greeting"):
            await vm.launch(timeout=60)
        assert vm.state == "failed"

    started = time.monotonic()
    run_async(main())
    assert time.monotonic() - started < 30


def test_missing_capabilities_reply_is_named_as_such(tmp_path: Path) -> None:
    vm = Machine(machine="none", qemu=_fake_qemu(tmp_path, "no-caps-reply"))
    with pytest.raises(LaunchError, match=r"no answer to qmp_capabilities \(the greeting came\)"):
        vm.launch(timeout=1)
    assert vm.state == "failed"


def test_qtest_channel_on_both_faces() -> None:
    """`qtest=True` gives `vm.qtest` on Machine and AsyncMachine alike (QEMU
    answers the protocol even without the qtest accelerator)."""
    with none_vm(qtest=True) as vm:
        assert vm.qtest.request("endianness") == "OK little"

    async def main() -> None:
        async with AsyncMachine(machine="none", memory=32, qemu=QEMU, qtest=True) as avm:
            assert await avm.qtest.request("endianness") == "OK little"

    run_async(main())
