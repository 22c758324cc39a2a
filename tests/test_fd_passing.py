"""Passing file descriptors to QEMU through a Machine, and QEMU using them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import QEMU, run_async

from vmpilot import AsyncMachine, Machine


def test_add_fd_before_launch_backs_a_block_device(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    fd = os.open(image, os.O_RDWR)
    vm = Machine(machine="none", memory=32, qemu=QEMU)
    try:
        vm.add_fd(fd, 1, "disk")
        vm.launch()
    finally:
        os.close(fd)  # QEMU holds its own copy now
    with vm:
        assert vm.execute("query-fdsets")[0]["fds"][0]["opaque"] == "disk"
        vm.execute(
            "blockdev-add",
            {"driver": "raw", "node-name": "d0",
             "file": {"driver": "file", "filename": "/dev/fdset/1"}},
        )  # fmt: skip
        vm.execute("human-monitor-command", {"command-line": 'qemu-io d0 "write -P 0x5a 4k 4k"'})
        assert "-add-fd" in vm.argv
    data = image.read_bytes()
    assert data[4096:8192] == b"Z" * 4096 and data[:4096] == b"\0" * 4096


def test_add_fd_at_run_time(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 65536)
    fd = os.open(image, os.O_RDWR)
    try:
        with Machine(machine="none", memory=32, qemu=QEMU) as vm:
            added = vm.add_fd(fd, 3)
            assert added is not None and added["fdset-id"] == 3
            vm.execute(
                "blockdev-add", {"driver": "file", "node-name": "f", "filename": "/dev/fdset/3"}
            )
            vm.execute("human-monitor-command", {"command-line": 'qemu-io f "write -P 0x41 0 512"'})
    finally:
        os.close(fd)
    assert image.read_bytes()[:512] == b"A" * 512


def test_send_fd_then_qemu_writes_its_migration_stream_into_it() -> None:
    r, w = os.pipe()
    try:
        with Machine(machine="none", memory=32, qemu=QEMU) as vm:
            vm.send_fd(w, "mig")
            os.close(w)
            w = -1
            vm.execute("migrate", {"uri": "fd:mig"})
            assert os.read(r, 4) == b"QEVM"  # QEMU's migration stream magic
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_bad_fd_refused_before_launch() -> None:
    vm = Machine(machine="none", qemu=QEMU)
    with pytest.raises(ValueError, match="not an open file descriptor"):
        vm.add_fd(9999, 1)
    with pytest.raises(ValueError, match="fdset_id"):
        vm.add_fd(0, -1)


def test_async_machine_fd_passing(tmp_path: Path) -> None:
    r, w = os.pipe()

    async def main() -> bytes:
        async with AsyncMachine(machine="none", memory=32, qemu=QEMU) as vm:
            await vm.send_fd(w, "mig")
            await vm.execute("migrate", {"uri": "fd:mig"})
            return os.read(r, 4)

    try:
        assert run_async(main()) == b"QEVM"
    finally:
        os.close(r)
        os.close(w)
