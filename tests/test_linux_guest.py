"""The bundled Linux guest end to end: build, boot under TCG (KVM only where
it is real), talk over the console, and every way it can end. Few boots:
each costs seconds under TCG."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import QEMU, run_async

from vmpilot import AbnormalShutdown, AsyncMachine, Machine, guest
from vmpilot.guest import GuestImage


def boot(image: GuestImage, options: str = "", **kw: object) -> Machine:
    vm = Machine(image.config(options=options, qemu=QEMU, **kw)).launch()  # type: ignore[arg-type]
    return vm


def test_boot_shell_and_acpi_powerdown(linux_guest: GuestImage) -> None:
    t0 = time.monotonic()
    with boot(linux_guest) as vm:
        vm.console.expect(guest.READY, timeout=120, fail="Kernel panic")
        vm.shell.wait_ready(timeout=60)
        boot_s = time.monotonic() - t0
        status, out = vm.shell.run("uname -r")
        assert (status, out.strip()) == (0, linux_guest.kernel_release)
        assert vm.shell.run("cat /proc/cmdline")[1].startswith("console=ttyS0")
        status, out = vm.shell.run("echo out; echo err >&2; exit_code() { return 7; }; exit_code")
        assert (status, out) == (7, "out\nerr\n")
        t1 = time.monotonic()
        vm.shutdown(method="powerdown", timeout=30)  # no AbnormalShutdown: the guest powered off
        print(
            f"boot→prompt {boot_s:.1f} s (accel {vm.accel}), powerdown→exit "
            f"{time.monotonic() - t1:.2f} s"
        )
    assert vm.exit_code == 0 and "powering off" in vm.console_log


def test_guest_ignoring_power_button_is_killed_and_reported(linux_guest: GuestImage) -> None:
    vm = boot(linux_guest, "vmpilot.pd=ignore")
    vm.shell.wait_ready(timeout=120)
    tmp, pid = vm.temp_dir, vm.pid
    with pytest.raises(AbnormalShutdown, match="did not exit within 3 s of 'system_powerdown'"):
        vm.shutdown(method="powerdown", timeout=3)
    assert "power button ignored" in vm.console_log
    assert vm.state == "stopped" and tmp is not None and not Path(tmp).exists()
    assert pid is not None and not Path(f"/proc/{pid}").exists()


def test_guest_chosen_exit_code_via_isa_debug_exit(linux_guest: GuestImage) -> None:
    vm = boot(linux_guest, "vmpilot.exit=5", devices=["isa-debug-exit,iobase=0xf4,iosize=4"])
    assert vm.wait(timeout=120) == 11  # (5 << 1) | 1
    assert not vm.crashed


def test_async_machine_with_the_linux_guest(linux_guest: GuestImage) -> None:
    async def main() -> str:
        async with AsyncMachine(linux_guest.config(qemu=QEMU)) as vm:
            await vm.shell.wait_ready(timeout=120)
            status, out = await vm.shell.run("echo $((6*7))")
            assert status == 0
            await vm.shutdown(method="powerdown")
            return out

    assert run_async(main()) == "42\n"


def test_image_files_and_cache(linux_guest: GuestImage) -> None:
    assert os.path.getsize(linux_guest.kernel) > 1_000_000
    assert Path(linux_guest.initrd).read_bytes()[:2] == b"\x1f\x8b"
    manifest = Path(linux_guest.path, "manifest.json")
    before = manifest.stat()
    said: list[str] = []
    again = guest.default(progress=said.append)
    assert again == linux_guest
    # cached: nothing was built, the build's files are the very same ones
    assert not any("building" in m for m in said), said
    after = manifest.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
