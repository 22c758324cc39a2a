"""Kernel modules for the guest's initramfs: which ones, their dependencies,
and the `modules.dep` / `modules.alias` busybox's `modprobe` reads.

Debian's kernel package carries no `modules.dep` (its postinst runs depmod),
and the host's depmod may be missing or differ: the indexes are written here
from each module's own `.modinfo` section (`depends=`, `alias=`), read from
its ELF bytes. Modules are chosen by their path under `kernel/`, which names
the same driver on every architecture; a module a kernel lacks is simply
not there (built in, or not configured), never an error at this level.
"""

from __future__ import annotations

import dataclasses
import gzip
import lzma
import os
import struct
import subprocess
from collections.abc import Iterator, Mapping

from ..errors import GuestError

# What the guest can use, by path under lib/modules/RELEASE/. Their
# dependencies are added from modinfo; `modprobe` loads them at boot for the
# devices present (by modalias), so an unused one costs only initramfs bytes.
WANTED = (
    "kernel/drivers/input/evdev.ko",  # the ACPI power button's /dev/input/event*
    "kernel/drivers/acpi/button.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/drivers/virtio/virtio_mmio.ko",  # virtio without PCI (arm virt can use it)
    "kernel/drivers/char/virtio_console.ko",  # qemu-ga's virtio-serial port
    "kernel/drivers/block/virtio_blk.ko",
    "kernel/drivers/scsi/virtio_scsi.ko",
    "kernel/drivers/scsi/sd_mod.ko",  # disks behind virtio-scsi, ata
    "kernel/drivers/scsi/sr_mod.ko",
    "kernel/drivers/ata/ahci.ko",
    "kernel/drivers/ata/ata_piix.ko",  # `if=ide` on the pc machine (PIIX IDE)
    "kernel/drivers/ata/ata_generic.ko",
    "kernel/drivers/net/virtio_net.ko",
    "kernel/fs/fuse/virtiofs.ko",
    "kernel/fs/fuse/fuse.ko",
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
    "kernel/net/9p/9pnet_virtio.ko",  # the 9p share transport, for kernels that have 9p
    "kernel/fs/9p/9p.ko",
    # CONFIG_PVPANIC=y is only the menu: the ISA device's driver is a module
    "kernel/drivers/misc/pvpanic/pvpanic.ko",
    "kernel/drivers/misc/pvpanic/pvpanic-mmio.ko",
)
_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


@dataclasses.dataclass(frozen=True)
class Module:
    path: str  # relative to lib/modules/RELEASE/, always ending in .ko
    data: bytes  # uncompressed
    depends: tuple[str, ...]  # module names
    aliases: tuple[str, ...]

    @property
    def name(self) -> str:
        return normalize(os.path.basename(self.path).removesuffix(".ko"))


def normalize(name: str) -> str:
    return name.replace("-", "_")


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The `key=value` strings of a module's `.modinfo` ELF section."""
    try:
        if data[:4] != b"\x7fELF" or data[4] != 2:
            raise GuestError("not a 64-bit ELF file")
        end = "<" if data[5] == 1 else ">"
        shoff = struct.unpack_from(end + "Q", data, 0x28)[0]
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x3A)
        headers = [
            struct.unpack_from(end + "IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)
        ]
        names_at = headers[shstrndx][4]
        info: dict[str, list[str]] = {}
        for name_off, _type, _flags, _addr, offset, size in headers:
            name = data[names_at + name_off : data.index(b"\0", names_at + name_off)]
            if name != b".modinfo":
                continue
            for entry in data[offset : offset + size].split(b"\0"):
                key, sep, value = entry.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
        return info
    except (struct.error, IndexError, ValueError) as exc:
        raise GuestError(f"malformed kernel module: {exc!r}") from exc


def decompress(path: str, data: bytes) -> bytes:
    """A module's ELF bytes (busybox's modprobe may not read compressed ones)."""
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        try:
            proc = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=False)
        except FileNotFoundError as exc:
            raise GuestError(f"{path} is zstd-compressed: install the zstd tool") from exc
        if proc.returncode != 0:
            raise GuestError(f"zstd cannot read {path}: {proc.stderr[-300:]!r}")
        return proc.stdout
    return data


def select(files: Mapping[str, bytes], wanted: tuple[str, ...] = WANTED) -> list[Module]:
    """The modules of `wanted` found in `files` ({path under the release dir:
    bytes, possibly compressed}) and everything they depend on, dependencies
    first. A wanted module that is not there is skipped (built in, or absent)."""
    by_stem: dict[str, str] = {}
    for path in files:
        for suffix in _SUFFIXES:
            if path.endswith(suffix):
                by_stem[path.removesuffix(suffix) + ".ko"] = path
    by_name = {normalize(os.path.basename(p).removesuffix(".ko")): p for p in by_stem}
    loaded: dict[str, Module] = {}
    order: list[Module] = []

    def visit(stem: str, chain: tuple[str, ...]) -> None:
        if stem in loaded:
            return
        source = by_stem[stem]
        data = decompress(source, files[source])
        info = modinfo(data)
        depends = tuple(normalize(d) for v in info.get("depends", []) for d in v.split(",") if d)
        module = Module(stem, data, depends, tuple(info.get("alias", [])))
        loaded[stem] = module
        for dep in depends:
            if dep not in by_name:
                raise GuestError(f"{stem} depends on {dep}, which is not among the modules")
            if by_name[dep] in chain:
                raise GuestError(f"circular module dependency: {' -> '.join(chain)}")
            visit(by_name[dep], (*chain, stem))
        order.append(module)

    for stem in wanted:
        if stem in by_stem:
            visit(stem, ())
    return order


def wanted_file(path: str) -> bool:
    """Whether a path under the release dir is a module (any may be a
    dependency; modinfo says which, once read)."""
    return path.startswith("kernel/") and path.endswith(_SUFFIXES)


def index(modules: list[Module]) -> dict[str, str]:
    """`modules.dep` (each module with its full dependency closure, in load
    order as modprobe wants) and `modules.alias`."""
    by_name = {m.name: m for m in modules}

    def closure(m: Module, seen: list[str]) -> list[str]:
        for dep in m.depends:
            d = by_name[dep]
            if d.path not in seen:
                closure(d, seen)
                seen.append(d.path)
        return seen

    dep_lines = []
    for m in modules:
        deps = list(reversed(closure(m, [])))  # modules.dep lists the nearest first
        dep_lines.append(f"{m.path}: {' '.join(deps)}".rstrip())
    alias_lines = [f"alias {a} {m.name}" for m in modules for a in m.aliases]
    return {
        "modules.dep": "\n".join(dep_lines) + "\n",
        "modules.alias": "\n".join(alias_lines) + "\n",
    }


class _Tree(Mapping[str, bytes]):
    """{path: bytes} of a modules directory, each file read when asked for:
    only the chosen modules and their dependencies are ever read."""

    def __init__(self, root: str, paths: list[str]) -> None:
        self.root, self.paths = root, paths

    def __getitem__(self, path: str) -> bytes:
        if path not in self.paths:
            raise KeyError(path)
        with open(os.path.join(self.root, path), "rb") as f:
            return f.read()

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def read_tree(directory: str) -> tuple[str, Mapping[str, bytes]]:
    """(release, {path: bytes}) of the modules under `directory`: the
    `INSTALL_MOD_PATH` of `make modules_install` (holding lib/modules/RELEASE)
    or that RELEASE directory itself."""
    root = directory
    for sub in ("lib/modules", "usr/lib/modules"):
        candidate = os.path.join(directory, sub)
        if os.path.isdir(candidate):
            releases = sorted(os.listdir(candidate))
            if len(releases) != 1:
                raise GuestError(
                    f"{candidate} holds {len(releases)} kernel releases ({', '.join(releases)}): "
                    f"pass the one directory of the kernel you boot"
                )
            root = os.path.join(candidate, releases[0])
            break
    if not os.path.isdir(os.path.join(root, "kernel")):
        raise GuestError(
            f"{directory} holds no kernel modules (no kernel/ directory): pass the "
            f"INSTALL_MOD_PATH of `make modules_install` or its lib/modules/RELEASE"
        )
    paths = []
    for dirpath, _dirs, names in os.walk(os.path.join(root, "kernel")):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if wanted_file(rel):
                paths.append(rel)
    return os.path.basename(os.path.normpath(root)), _Tree(root, sorted(paths))
