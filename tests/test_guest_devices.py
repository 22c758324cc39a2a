"""Devices the bundled guest can use: its initramfs carries the drivers with
the `modules.dep` / `modules.alias` busybox's modprobe reads, and init loads
those of the devices present. Real QEMU under TCG, a few boots."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
from conftest import QEMU

from vmpilot import Drive, GuestError, Machine
from vmpilot.guest import GuestImage
from vmpilot.guest import modules as mods

BOOT_TIMEOUT = 120


def fake_module(info: dict[str, str]) -> bytes:
    """A minimal 64-bit ELF with a .modinfo section (what a .ko carries)."""
    modinfo = b"".join(f"{k}={v}".encode() + b"\0" for k, v in info.items())
    shstr = b"\0.modinfo\0.shstrtab\0"
    data_off = 64
    shstr_off = data_off + len(modinfo)
    sh_off = shstr_off + len(shstr)
    header = struct.pack(
        "<4s5B7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0,
        1, 0x3E, 1, 0, 0, sh_off, 0, 64, 0, 0, 64, 3, 2,
    )  # fmt: skip
    null = b"\0" * 64
    sec_modinfo = struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, data_off, len(modinfo), 0, 0, 1, 0)
    sec_shstr = struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, shstr_off, len(shstr), 0, 0, 1, 0)
    return header + modinfo + shstr + null + sec_modinfo + sec_shstr


def test_dependencies_and_aliases_come_from_modinfo() -> None:
    files = {
        "kernel/drivers/block/virtio_blk.ko": fake_module(
            {"alias": "virtio:d00000002v*", "depends": "virtio,virtio_ring"}
        ),
        "kernel/drivers/virtio/virtio.ko": fake_module({"depends": "virtio_ring"}),
        "kernel/drivers/virtio/virtio_ring.ko": fake_module({"depends": ""}),
        "kernel/drivers/unrelated.ko": fake_module({"depends": ""}),
    }
    selected = mods.select(files, ("kernel/drivers/block/virtio_blk.ko", "kernel/missing.ko"))
    assert [m.name for m in selected] == ["virtio_ring", "virtio", "virtio_blk"]
    index = mods.index(selected)
    # modprobe loads a line's dependencies from the last to the first
    assert index["modules.dep"].splitlines()[-1] == (
        "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko "
        "kernel/drivers/virtio/virtio_ring.ko"
    )
    assert index["modules.alias"] == "alias virtio:d00000002v* virtio_blk\n"


def test_a_dependency_that_is_not_there_is_an_error() -> None:
    files = {"kernel/a.ko": fake_module({"depends": "b"})}
    with pytest.raises(GuestError, match="depends on b"):
        mods.select(files, ("kernel/a.ko",))


def boot(image: GuestImage, **kw: object) -> Machine:
    vm = Machine(image.config(qemu=QEMU, **kw)).launch()  # type: ignore[arg-type]
    vm.shell.wait_ready(timeout=BOOT_TIMEOUT)
    return vm


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def test_virtio_blk_and_scsi_disks_and_a_qcow2_written_in_the_guest(
    linux_guest: GuestImage, tmp_path: Path
) -> None:
    disk, scsi = tmp_path / "disk.qcow2", tmp_path / "scsi.raw"
    qemu_img("create", "-f", "qcow2", str(disk), "16M")
    qemu_img("create", "-f", "raw", str(scsi), "8M")
    vm = boot(
        linux_guest,
        drives=[Drive(disk, format="qcow2"), Drive(scsi, interface="none", id="scsi0")],
        devices=["virtio-scsi-pci,id=scsi", "scsi-hd,drive=scsi0,bus=scsi.0"],
    )
    with vm:
        parts = vm.shell.check("cat /proc/partitions")
        assert " vda" in parts and " sda" in parts, parts
        # modprobe works: modules.dep resolves the vsock transport's dependencies
        vm.shell.check("modprobe vmw_vsock_virtio_transport && grep -q '^vsock ' /proc/modules")
        # 64 KiB of 0x5a at offset 1 MiB, flushed to the image
        vm.shell.check(
            "dd if=/dev/zero bs=64k count=1 2>/dev/null | tr '\\000' Z "
            "| dd of=/dev/vda bs=64k seek=16 conv=fsync 2>/dev/null"
        )
        vm.shutdown(method="powerdown", timeout=60)
    check = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x5a 1M 64k", "-c", "read -P 0 0 1M",
         str(disk)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "Pattern verification failed" not in check.stdout, check.stdout
    assert check.stdout.count("read 65536/65536") == 1 and "read 1048576/1048576" in check.stdout


def test_ide_drive_on_the_pc_machine(linux_guest: GuestImage, tmp_path: Path) -> None:
    # Debian's cloud kernel has ata_piix but no AHCI: q35's IDE (an AHCI
    # controller) stays invisible to it, the pc machine's PIIX IDE does not
    disk = tmp_path / "ide.raw"
    qemu_img("create", "-f", "raw", str(disk), "8M")
    with boot(linux_guest, machine="pc", drives=[Drive(disk, interface="ide")]) as vm:
        parts = vm.shell.check("cat /proc/partitions")
        assert " sda" in parts, parts
        assert "ata_piix" in vm.shell.check("cat /proc/modules")
