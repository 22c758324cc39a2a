"""Build the bundled Linux guest from Debian packages, cached.

A Debian cloud kernel (taken from its .deb, never installed) and a busybox
initramfs written in Python. The build is keyed by a hash of its inputs
(package file names, init script, this builder), written to a temp dir and
renamed into place, under a file lock: two processes (pytest-xdist workers)
building at once get one build.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any

from ..errors import GuestError
from ..machine.config import MachineConfig
from . import deb
from .cpio import CpioWriter

KERNEL_META = "linux-image-cloud-amd64"  # LZ4-compressed: boots ~2x faster under TCG
BUILDER_VERSION = "2"

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
        return MachineConfig(**values)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _init_script() -> str:
    return resources.files("vmpilot.guest").joinpath("init.sh").read_text()


def _key(debs: dict[str, str], init: str, agent: bool) -> str:
    with open(__file__, "rb") as f:
        me = f.read()
    blob = json.dumps(
        [sorted(os.path.basename(d) for d in debs.values()), init, BUILDER_VERSION, agent,
         hashlib.sha256(me).hexdigest()]
    )  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _busybox_applets(busybox: bytes, tmp: str) -> list[str]:
    path = os.path.join(tmp, "busybox")
    with open(path, "wb") as f:
        f.write(busybox)
    os.chmod(path, 0o755)
    try:
        out = subprocess.run(
            [path, "--list-full"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    finally:
        os.unlink(path)
    return out.split()


def _newest_built(root: str, agent: bool) -> GuestImage | None:
    images = [
        _load(os.path.join(root, d))
        for d in (os.listdir(root) if os.path.isdir(root) else [])
        if os.path.exists(os.path.join(root, d, "manifest.json"))
    ]
    images = [i for i in images if i.agent == agent]
    if not images:
        return None
    return max(images, key=lambda i: os.path.getmtime(os.path.join(i.path, "manifest.json")))


def _load(path: str) -> GuestImage:
    with open(os.path.join(path, "manifest.json")) as f:
        m = json.load(f)
    return GuestImage(
        kernel=os.path.join(path, "vmlinuz"),
        initrd=os.path.join(path, "initramfs.cpio.gz"),
        kernel_release=m["kernel_release"],
        path=path,
        agent=bool(m.get("agent")),
    )


Progress = Callable[[str], None]


def build(
    cache: str | None = None, *, agent: bool = False, progress: Progress | None = None
) -> GuestImage:
    """Build (or reuse) the guest and return it; `agent=True` adds qemu-ga
    (Debian's qemu-guest-agent with its libraries, and the virtio console)."""
    say = progress or (lambda _msg: None)
    root = cache or cache_root()
    guests = os.path.join(root, "guest")
    debs_dir = os.path.join(root, "debs")
    t0 = time.monotonic()
    kernel_pkg = deb.resolve(KERNEL_META)
    if kernel_pkg is None:
        existing = _newest_built(guests, agent)
        if existing is not None:
            return existing  # offline, or no apt lists: the last good build
        raise deb.PackageError(
            f"apt does not know {KERNEL_META} (Debian's cloud kernel). Run `apt-get update` "
            f"(as root) on a Debian machine, then build again"
        )
    with _locked(os.path.join(root, "guest.lock")):
        packages = [kernel_pkg, "busybox-static"] + (["qemu-guest-agent"] if agent else [])
        debs = deb.fetch(packages, debs_dir)
        init = _init_script()
        key = _key(debs, init, agent)
        final = os.path.join(guests, key)
        if os.path.exists(os.path.join(final, "manifest.json")):
            return _load(final)
        say(f"building the guest from {', '.join(packages)}")
        os.makedirs(guests, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".build-", dir=guests)
        try:
            _write(tmp, debs, kernel_pkg, init, agent, say)
            with open(os.path.join(tmp, "manifest.json")) as f:
                manifest = json.load(f)
            manifest["build_seconds"] = round(time.monotonic() - t0, 2)
            with open(os.path.join(tmp, "manifest.json"), "w") as f:
                json.dump(manifest, f, indent=2)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        say(f"guest built in {time.monotonic() - t0:.1f} s: {final}")
        return _load(final)


def _write(
    out: str, debs: dict[str, str], kernel_pkg: str, init: str, agent: bool, say: Progress
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
        raise GuestError(f"{debs[kernel_pkg]} holds no boot/vmlinuz-*")
    release = vmlinuz[0].removeprefix("boot/vmlinuz-")
    say(f"extracted kernel {release}")
    busybox = deb.extract(debs["busybox-static"], lambda p: p == "bin/busybox").get("bin/busybox")
    if busybox is None:
        raise GuestError(f"{debs['busybox-static']} holds no bin/busybox")

    cpio = CpioWriter()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "root"):
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1)  # init's stdio, opened before devtmpfs is mounted
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.file("init", init, 0o755)
    cpio.file("bin/busybox", busybox, 0o755)
    for applet in _busybox_applets(busybox, out):
        cpio.symlink(applet, "/bin/busybox")
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
        _add_agent(cpio, debs["qemu-guest-agent"], out)
    initrd = gzip.compress(cpio.getvalue(), compresslevel=6, mtime=0)
    with open(os.path.join(out, "initramfs.cpio.gz"), "wb") as f:
        f.write(initrd)
    with open(os.path.join(out, "vmlinuz"), "wb") as f:
        f.write(kfiles[vmlinuz[0]])
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(
            {"kernel_release": release, "kernel_package": kernel_pkg,
             "debs": {p: os.path.basename(d) for p, d in debs.items()},
             "initramfs_bytes": len(initrd), "modules": lines, "agent": agent},
            f, indent=2,
        )  # fmt: skip


def _add_agent(cpio: CpioWriter, agent_deb: str, tmp: str) -> None:
    """qemu-ga and the host's copies of the libraries it links (they are
    dependencies of qemu-system-x86, so wherever QEMU runs they exist)."""
    qga = deb.extract(agent_deb, lambda p: p == "usr/sbin/qemu-ga").get("usr/sbin/qemu-ga")
    if qga is None:
        raise GuestError(f"{agent_deb} holds no usr/sbin/qemu-ga")
    path = os.path.join(tmp, "qemu-ga")
    with open(path, "wb") as f:
        f.write(qga)
    os.chmod(path, 0o755)
    try:
        out = subprocess.run(
            ["ldd", path], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    finally:
        os.unlink(path)
    for line in out.splitlines():
        if "not found" in line:
            raise GuestError(
                f"qemu-ga needs {line.split()[0]}, missing on this machine: install "
                f"qemu-system-x86 (it depends on the same libraries)"
            )
        lib = next((w for w in line.split() if w.startswith("/")), None)
        if lib is not None:
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
        if os.path.exists(path):
            shutil.rmtree(path)
            removed.append(path)
    return removed
