"""Build the bundled Linux guest from Debian packages, cached.

A Debian cloud kernel (taken from its .deb, never installed) and a busybox
initramfs written in Python. The build is keyed by a hash of its inputs
(the packages' hashes as apt's index gives them, init script, this builder),
written to a temp dir and renamed into place, under a file lock: two
processes (pytest-xdist workers) building at once get one build.

The cache is not trusted blindly: its directories must be ours and private,
each package is checked against apt's hash before it is read, nothing taken
from a package runs on the host, and a cached guest is used only when its
files hash to what its manifest recorded at build time (else it is rebuilt).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import pathlib
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from ..errors import GuestError
from ..machine.config import MachineConfig
from . import cpio as cpio_module
from . import deb, elf, private
from .cpio import CpioWriter

KERNEL_META = "linux-image-cloud-amd64"  # LZ4-compressed: boots ~2x faster under TCG
BUILDER_VERSION = "3"

# qemu-ga's guest-shutdown runs `/sbin/shutdown -P|-H|-r +0 ...`; busybox has
# no shutdown applet.
SHUTDOWN_SHIM = """#!/bin/sh
case "$1" in -r) reboot -f ;; -H) halt -f ;; *) poweroff -f ;; esac
"""
PROMPT = "guest# "
READY = "vmpilot-guest: ready"
DEFAULT_APPEND = "console=ttyS0 panic=-1 quiet"

# (group, module) in load order; init loads a group only when it is useful.
MODULES = [
    ("power", "kernel/drivers/input/evdev.ko"),
    ("power", "kernel/drivers/acpi/button.ko"),
    ("virtio", "kernel/drivers/virtio/virtio_ring.ko"),
    ("virtio", "kernel/drivers/virtio/virtio.ko"),
    ("virtio", "kernel/drivers/virtio/virtio_pci_legacy_dev.ko"),
    ("virtio", "kernel/drivers/virtio/virtio_pci_modern_dev.ko"),
    ("virtio", "kernel/drivers/virtio/virtio_pci.ko"),
    ("virtio", "kernel/drivers/char/virtio_console.ko"),
    # CONFIG_PVPANIC=y is only the menu: the ISA device's driver is a module
    ("panic", "kernel/drivers/misc/pvpanic/pvpanic.ko"),
    ("panic", "kernel/drivers/misc/pvpanic/pvpanic-mmio.ko"),
]

# /bin/ioport-exit N: ioperm(0xf4) + outb(N, 0xf4), for isa-debug-exit. The
# cloud kernel has no /dev/port, so the shell cannot do it. Machine code of
# ../shared/guest/asm/ioexit.s (the measured recipe), wrapped in an ELF below.
_IOEXIT = bytes.fromhex(
    "488b3c2431db4883ff02721a488b7424100fb60683e83083f809770a6bdb0a01c348ffc6ebeb"
    "b8ad000000bff4000000be01000000ba010000000f0589d8baf4000000eeb83c000000bf0100"
    "00000f05"
)


def _static_elf(code: bytes, base: int = 0x400000) -> bytes:
    """The smallest x86-64 executable: ELF header, one PT_LOAD, the code."""
    ehdr_size, phdr_size = 64, 56
    total = ehdr_size + phdr_size + len(code)
    entry = base + ehdr_size + phdr_size
    ehdr = struct.pack(
        "<4s5B7xHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0,  # 64-bit, little endian, version 1, SysV ABI
        2, 0x3E, 1, entry, ehdr_size, 0, 0, ehdr_size, phdr_size, 1, 0, 0, 0,
    )  # fmt: skip
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, total, total, 0x1000)
    return ehdr + phdr + code


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vmpilot")


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A built guest: what to boot and how."""

    kernel: str
    initrd: str
    append: str = DEFAULT_APPEND
    kernel_release: str = ""
    path: str = ""
    agent: bool = False  # qemu-ga is in the initramfs

    def config(self, *, options: str = "", **overrides: Any) -> MachineConfig:
        """A `MachineConfig` that boots this guest with its serial console on.

        `options` are extra kernel command line words (e.g. `vmpilot.pd=ignore`).
        """
        append = f"{self.append} {options}".strip()
        values: dict[str, Any] = dict(
            machine="q35",
            memory="256M",
            kernel=self.kernel,
            initrd=self.initrd,
            append=append,
            serial=True,
            no_reboot=True,
            agent=self.agent,
        )
        values.update(overrides)
        # pvpanic: a panic is reported as GUEST_PANICKED (with the guest's own devices too)
        devices = list(values.get("devices", ()))
        values["devices"] = devices if "pvpanic" in devices else ["pvpanic", *devices]
        return MachineConfig(**values)


def _init_script() -> str:
    return resources.files("vmpilot.guest").joinpath("init.sh").read_text()


def _key(debs: dict[str, deb.Deb], init: str, agent: bool) -> str:
    """Names this build's inputs: a change of package, init or builder code
    gets a new directory, never a stale one."""
    builder = [__file__] + [m.__file__ for m in (deb, elf, cpio_module, private) if m.__file__]
    sources = [hashlib.sha256(pathlib.Path(p).read_bytes()).hexdigest() for p in builder]
    blob = json.dumps(
        [sorted((d.package.filename, d.package.digest) for d in debs.values()), init,
         BUILDER_VERSION, agent, sources]
    )  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


BOOT_FILES = ("vmlinuz", "initramfs.cpio.gz")


def _file_record(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def load(path: str) -> GuestImage:
    """The guest built in `path`, after checking that its boot files are
    those its manifest recorded (size and SHA-256); `GuestError` otherwise."""
    try:
        m = json.loads(private.read(os.path.join(path, "manifest.json")))
        records = m["files"]
        for name in BOOT_FILES:
            data = private.read(os.path.join(path, name))
            if _file_record(data) != records[name]:
                raise GuestError(
                    f"{os.path.join(path, name)} does not match the manifest: "
                    f"{_file_record(data)} != {records[name]}"
                )
        release = str(m["kernel_release"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GuestError(f"{path} holds no intact guest build: {exc!r}") from exc
    return GuestImage(
        kernel=os.path.join(path, "vmlinuz"),
        initrd=os.path.join(path, "initramfs.cpio.gz"),
        kernel_release=release,
        path=path,
        agent=bool(m.get("agent")),
    )


def _discard(path: str) -> None:
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path)


Progress = Callable[[str], None]


def build(
    cache: str | None = None, *, agent: bool = False, progress: Progress | None = None
) -> GuestImage:
    """Build (or reuse) the guest and return it; `agent=True` adds qemu-ga
    (Debian's qemu-guest-agent with its libraries, and the virtio console)."""
    say = progress or (lambda _msg: None)
    root = private.directory(cache or cache_root(), follow=True)
    guests = os.path.join(root, "guest")
    debs_dir = os.path.join(root, "debs")
    t0 = time.monotonic()
    try:
        kernel_pkg = deb.resolve(KERNEL_META)
    except deb.PackageError as exc:
        # No guessing from what is in the cache: without apt nothing says which
        # build is current, and a directory there may not be one we built.
        raise deb.PackageError(
            f"apt cannot resolve {KERNEL_META} (Debian's cloud kernel): {exc}. The guest is "
            f"built from the packages apt names, so without apt no cached build is used. "
            f"Run `apt-get update` (as root) on a Debian machine, then build again"
        ) from exc
    with private.locked(os.path.join(root, "guest.lock")):
        private.directory(guests)
        packages = [kernel_pkg, "busybox-static"] + (["qemu-guest-agent"] if agent else [])
        debs = deb.fetch(packages, debs_dir)
        init = _init_script()
        key = _key(debs, init, agent)
        final = os.path.join(guests, key)
        if os.path.lexists(final):
            try:
                private.directory(final)
                return load(final)
            except (GuestError, OSError) as exc:  # OSError: not a directory at all
                say(f"not using the cached guest ({exc}): rebuilding it")
                _discard(final)
        say(f"building the guest from {', '.join(packages)}")
        tmp = tempfile.mkdtemp(prefix=".build-", dir=guests)
        try:
            _write(tmp, debs, kernel_pkg, init, agent, say, t0)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        say(f"guest built in {time.monotonic() - t0:.1f} s: {final}")
        return load(final)


def _write(
    out: str,
    debs: dict[str, deb.Deb],
    kernel_pkg: str,
    init: str,
    agent: bool,
    say: Progress,
    t0: float,
) -> None:
    wanted = {m for _, m in MODULES}
    kfiles = deb.extract(
        debs[kernel_pkg],
        lambda p: (
            p.startswith("boot/vmlinuz-")
            or (p.startswith("lib/modules/") and p.split("/", 3)[-1] in wanted)
        ),
    )
    vmlinuz = [p for p in kfiles if p.startswith("boot/vmlinuz-")]
    if not vmlinuz:
        raise GuestError(f"{debs[kernel_pkg].package.filename} holds no boot/vmlinuz-*")
    release = vmlinuz[0].removeprefix("boot/vmlinuz-")
    say(f"extracted kernel {release}")
    busybox = deb.extract(debs["busybox-static"], lambda p: p == "bin/busybox").get("bin/busybox")
    if busybox is None:
        raise GuestError(f"{debs['busybox-static'].package.filename} holds no bin/busybox")

    cpio = CpioWriter()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "root"):
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1)  # init's stdio, opened before devtmpfs is mounted
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.file("init", init, 0o755)
    cpio.file("bin/busybox", busybox, 0o755)
    cpio.symlink("bin/sh", "/bin/busybox")  # /init's interpreter; it installs the other applets
    cpio.file("bin/ioport-exit", _static_elf(_IOEXIT), 0o755)
    cpio.file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", "root:x:0:\n")
    lines = []
    for group, module in MODULES:
        path = f"lib/modules/{release}/{module}"
        if path not in kfiles:
            raise GuestError(f"module {module} is not in {kernel_pkg}")
        name = os.path.basename(module).removesuffix(".ko")
        cpio.file(f"lib/modules/{name}.ko", kfiles[path])
        lines.append(f"{group} {name}")
    cpio.file("etc/modules", "\n".join(lines) + "\n")
    if agent:
        _add_agent(cpio, debs["qemu-guest-agent"])
    files = {
        "initramfs.cpio.gz": gzip.compress(cpio.getvalue(), compresslevel=6, mtime=0),
        "vmlinuz": kfiles[vmlinuz[0]],
    }
    for name, data in files.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(
            {"kernel_release": release, "kernel_package": kernel_pkg,
             "debs": {p: {"file": d.package.filename, d.package.hash_name: d.package.digest}
                      for p, d in debs.items()},
             "files": {name: _file_record(data) for name, data in files.items()},
             "modules": lines, "agent": agent,
             "build_seconds": round(time.monotonic() - t0, 2)},
            f, indent=2,
        )  # fmt: skip


def _add_agent(cpio: CpioWriter, agent_deb: deb.Deb) -> None:
    """qemu-ga and the host's copies of the libraries it links (they are
    dependencies of qemu-system-x86, so wherever QEMU runs they exist). The
    libraries are read from qemu-ga's ELF headers: it is never run here."""
    qga = deb.extract(agent_deb, lambda p: p == "usr/sbin/qemu-ga").get("usr/sbin/qemu-ga")
    if qga is None:
        raise GuestError(f"{agent_deb.package.filename} holds no usr/sbin/qemu-ga")
    for lib in elf.host_libraries(qga):
        with open(os.path.realpath(lib), "rb") as f:
            cpio.file(lib, f.read(), 0o755)
    cpio.file("usr/sbin/qemu-ga", qga, 0o755)
    cpio.file("sbin/shutdown", SHUTDOWN_SHIM, 0o755)


def default(*, agent: bool = False, progress: Progress | None = None) -> GuestImage:
    """The bundled guest (with qemu-ga if `agent`), built on first use and cached."""
    return build(agent=agent, progress=progress)


def clean(cache: str | None = None) -> list[str]:
    """Remove every cached guest build and downloaded package; returns what went."""
    root = cache or cache_root()
    removed = []
    for sub in ("guest", "debs"):
        path = os.path.join(root, sub)
        if os.path.lexists(path):
            _discard(path)  # a symlink goes, never what it points to
            removed.append(path)
    return removed
