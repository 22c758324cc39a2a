"""Your own kernel with the bundled userspace (`image.config(kernel=...,
modules=...)`, `guest.for_kernel`): exercised with the Debian kernel passed
explicitly, its modules directory extracted from the .deb as `make
modules_install INSTALL_MOD_PATH=DIR` would lay it out."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import QEMU

from vmpilot import Drive, GuestError, Machine, guest
from vmpilot.guest import GuestImage, deb
from vmpilot.guest.build import KERNEL_META, cache_root

BOOT_TIMEOUT = 120


@pytest.fixture(scope="module")
def debian_kernel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(vmlinuz, INSTALL_MOD_PATH) of Debian's cloud kernel, from its package."""
    out = tmp_path_factory.mktemp("kernel")
    package = deb.resolve(KERNEL_META)
    kdeb = deb.fetch([package], os.path.join(cache_root(), "debs"))[package]
    files = deb.extract(kdeb, lambda p: p.startswith(("boot/vmlinuz-", "lib/modules/")))
    for path, data in files.items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(data)
    (vmlinuz,) = (out / "boot").glob("vmlinuz-*")
    return vmlinuz, out


def test_own_kernel_and_modules_boot_and_see_a_virtio_disk(
    linux_guest: GuestImage, debian_kernel: tuple[Path, Path], tmp_path: Path
) -> None:
    vmlinuz, mod_path = debian_kernel
    disk = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-f", "raw", str(disk), "8M"], check=True)
    cfg = linux_guest.config(kernel=vmlinuz, modules=mod_path, qemu=QEMU, drives=[Drive(disk)])
    assert cfg.kernel == str(vmlinuz) and cfg.initrd != linux_guest.initrd
    again = guest.for_kernel(vmlinuz, mod_path)  # cached by what goes in
    assert again.initrd == cfg.initrd
    with Machine(cfg) as vm:
        vm.shell.wait_ready(timeout=BOOT_TIMEOUT)
        assert " vda" in vm.shell.check("cat /proc/partitions")
        assert vm.shell.check("uname -r").strip() == linux_guest.kernel_release


def test_a_kernel_without_modules_gets_an_initramfs_without_any(
    debian_kernel: tuple[Path, Path], tmp_path: Path
) -> None:
    # what a kernel with its drivers built in needs: busybox and /init only.
    # The cloud kernel has its serial console built in (the shell works) but
    # virtio_blk as a module: without modules, its disk stays invisible
    vmlinuz, _ = debian_kernel
    disk = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-f", "raw", str(disk), "8M"], check=True)
    image = guest.for_kernel(vmlinuz)
    with Machine(image.config(qemu=QEMU, drives=[Drive(disk)])) as vm:
        vm.shell.wait_ready(timeout=BOOT_TIMEOUT)
        assert vm.shell.check("ls /lib/modules 2>/dev/null | wc -l").strip() == "0"
        assert "vda" not in vm.shell.check("cat /proc/partitions")


def test_modules_without_a_kernel_are_refused(linux_guest: GuestImage, tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="needs the kernel"):
        linux_guest.config(modules=tmp_path)
    with pytest.raises(GuestError, match="holds no kernel modules"):
        guest.for_kernel(linux_guest.kernel, tmp_path)
