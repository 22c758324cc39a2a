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
import platform
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from ..errors import GuestError
from ..machine.config import ARCHES, MachineConfig
from . import cpio as cpio_module
from . import deb, elf, foreign, gpiowait, private
from . import modules as modules_module
from .cpio import CpioWriter

KERNEL_META = "linux-image-cloud-amd64"  # LZ4-compressed: boots ~2x faster under TCG
BUILDER_VERSION = "4"

# qemu-ga's guest-shutdown runs `/sbin/shutdown -P|-H|-r +0 ...`; busybox has
# no shutdown applet.
SHUTDOWN_SHIM = """#!/bin/sh
case "$1" in -r) reboot -f ;; -H) halt -f ;; *) poweroff -f ;; esac
"""
PROMPT = "guest# "
READY = "vmpilot-guest: ready"
DEFAULT_APPEND = "console=ttyS0 panic=-1 quiet"


def _append(arch: str) -> str:
    return DEFAULT_APPEND.replace("ttyS0", ARCHES[arch].console)


# busybox udhcpc's hook: configure the NIC from the lease (no DNS: user-mode
# networking's 10.0.2.3 resolver is written when offered)
UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  bound|renew)
    ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
    [ -n "$router" ] && route add default gw "${router%% *}" dev "$interface" 2>/dev/null
    : >/etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done ;;
  deconfig) ifconfig "$interface" 0.0.0.0 ;;
esac
exit 0
"""

# /bin/ioport-exit N: ioperm(0xf4) + outb(N, 0xf4), for isa-debug-exit. The
# cloud kernel has no /dev/port, so the shell cannot do it. Machine code of
# ../shared/guest/asm/ioexit.s (the measured recipe), wrapped in an ELF below.
_IOEXIT = bytes.fromhex(
    "488b3c2431db4883ff02721a488b7424100fb60683e83083f809770a6bdb0a01c348ffc6ebeb"
    "b8ad000000bff4000000be01000000ba010000000f0589d8baf4000000eeb83c000000bf0100"
    "00000f05"
)


def _static_elf(code: bytes, base: int = 0x400000, machine: int = 0x3E) -> bytes:
    """The smallest 64-bit executable (x86-64, or aarch64 with `machine`
    0xB7): ELF header, one PT_LOAD, the code."""
    ehdr_size, phdr_size = 64, 56
    total = ehdr_size + phdr_size + len(code)
    entry = base + ehdr_size + phdr_size
    ehdr = struct.pack(
        "<4s5B7xHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0,  # 64-bit, little endian, version 1, SysV ABI
        2, machine, 1, entry, ehdr_size, 0, 0, ehdr_size, phdr_size, 1, 0, 0, 0,
    )  # fmt: skip
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, total, total, 0x1000)
    return ehdr + phdr + code


@dataclasses.dataclass(frozen=True)
class GuestArch:
    """Where the guest of one architecture comes from."""

    name: str  # `uname -m`
    deb_arch: str  # Debian's name
    kernel_meta: str
    programs: dict[str, bytes]  # path in the initramfs: static executable


def guest_arch(arch: str) -> GuestArch:
    if arch == "x86_64":
        return GuestArch(arch, "amd64", KERNEL_META, {"bin/ioport-exit": _static_elf(_IOEXIT)})
    if arch == "aarch64":
        return GuestArch(
            # the same drivers by path (modules.WANTED); no power modules: the
            # button is a GPIO line (gpiowait.py; PL061 and gpiochip are built in)
            arch, "arm64", "linux-image-cloud-arm64",
            {"bin/gpio-wait": _static_elf(gpiowait.CODE, machine=0xB7)},
        )  # fmt: skip
    raise GuestError(f"no bundled guest for arch {arch!r} (there are: x86_64, aarch64)")


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
    arch: str = "x86_64"  # the guest's `uname -m`: picks QEMU's binary, board and CPU

    def config(
        self,
        *,
        options: str = "",
        kernel: str | os.PathLike[str] | None = None,
        modules: str | os.PathLike[str] | None = None,
        **overrides: Any,
    ) -> MachineConfig:
        """A `MachineConfig` that boots this guest with its serial console on.

        `options` are extra kernel command line words (e.g. `vmpilot.pd=ignore`).
        `kernel` boots your own kernel with this guest's userspace, and
        `modules` its modules (the `INSTALL_MOD_PATH` of `make modules_install`):
        see `for_kernel`.
        """
        if kernel is not None or modules is not None:
            if kernel is None:
                raise GuestError("modules= needs the kernel= they were built for")
            own = for_kernel(kernel, modules, agent=self.agent, arch=self.arch)
            own = dataclasses.replace(own, append=self.append)
            return own.config(options=options, **overrides)
        append = f"{self.append} {options}".strip()
        values: dict[str, Any] = dict(
            arch=self.arch,
            memory="256M",
            kernel=self.kernel,
            initrd=self.initrd,
            append=append,
            serial=True,
            no_reboot=True,
            agent=self.agent,
        )
        values.update(overrides)
        # pvpanic (ISA, x86): a panic is reported as GUEST_PANICKED (with the guest's own
        # devices too). On aarch64's virt board the console's panic line is the evidence.
        devices = list(values.get("devices", ()))
        if self.arch == "x86_64" and "pvpanic" not in devices:
            devices.insert(0, "pvpanic")
        values["devices"] = devices
        return MachineConfig(**values)


def _init_script() -> str:
    return resources.files("vmpilot.guest").joinpath("init.sh").read_text()


def _key(debs: dict[str, deb.Deb], init: str, agent: bool, arch: str) -> str:
    """Names this build's inputs: a change of package, init or builder code
    gets a new directory, never a stale one."""
    modules = (deb, elf, cpio_module, private, gpiowait, modules_module)
    builder = [__file__] + [m.__file__ for m in modules if m.__file__]
    sources = [hashlib.sha256(pathlib.Path(p).read_bytes()).hexdigest() for p in builder]
    blob = json.dumps(
        [sorted((d.package.filename, d.package.digest) for d in debs.values()), init,
         BUILDER_VERSION, agent, sources, arch]
    )  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


BOOT_FILES = ("vmlinuz", "initramfs.cpio.gz")


def _file_record(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def load(path: str, kernel: str | None = None) -> GuestImage:
    """The guest built in `path`, after checking that its boot files are
    those its manifest recorded (size and SHA-256); `GuestError` otherwise.
    With `kernel` (a `for_kernel` build), only the initramfs is ours."""
    try:
        m = json.loads(private.read(os.path.join(path, "manifest.json")))
        records = m["files"]
        for name in BOOT_FILES if kernel is None else BOOT_FILES[1:]:
            data = private.read(os.path.join(path, name))
            if _file_record(data) != records[name]:
                raise GuestError(
                    f"{os.path.join(path, name)} does not match the manifest: "
                    f"{_file_record(data)} != {records[name]}"
                )
        release = str(m["kernel_release"])
        arch = str(m.get("arch", "x86_64"))
        guest_arch(arch)
    except (OSError, ValueError, KeyError, TypeError, GuestError) as exc:
        raise GuestError(f"{path} holds no intact guest build: {exc!r}") from exc
    return GuestImage(
        kernel=kernel or os.path.join(path, "vmlinuz"),
        initrd=os.path.join(path, "initramfs.cpio.gz"),
        kernel_release=release,
        path=path,
        agent=bool(m.get("agent")),
        arch=arch,
        append=_append(arch),
    )


def _discard(path: str) -> None:
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path)


Progress = Callable[[str], None]


def build(
    cache: str | None = None,
    *,
    agent: bool = False,
    arch: str = "x86_64",
    progress: Progress | None = None,
) -> GuestImage:
    """Build (or reuse) the guest and return it; `agent=True` adds qemu-ga
    (Debian's qemu-guest-agent with its libraries, and the virtio console).
    `arch` "aarch64" builds it from Debian's arm64 packages (through a private
    apt configuration: see `foreign`), for QEMU's virt board."""
    say = progress or (lambda _msg: None)
    spec = guest_arch(arch)
    root = private.directory(cache or cache_root(), follow=True)
    guests = os.path.join(root, "guest")
    debs_dir = os.path.join(root, "debs")
    t0 = time.monotonic()
    with private.locked(os.path.join(root, "guest.lock")), deb.remembered(root):
        apt: list[str] = []
        if arch != platform.machine():
            apt = foreign.prepare(root, spec.deb_arch)
        try:
            kernel_pkg = deb.resolve(spec.kernel_meta, apt)
        except deb.PackageError as exc:
            # No guessing from what is in the cache: without apt nothing says which
            # build is current, and a directory there may not be one we built.
            raise deb.PackageError(
                f"apt cannot resolve {spec.kernel_meta} (Debian's cloud kernel): {exc}. The "
                f"guest is built from the packages apt names, so without apt no cached build "
                f"is used. Run `apt-get update` (as root) on a Debian machine, then build again"
            ) from exc
        private.directory(guests)
        packages = [kernel_pkg, "busybox-static"]
        if agent:
            # another architecture's qemu-ga cannot use the host's libraries:
            # its own come from its dependencies' packages
            packages += deb.closure("qemu-guest-agent", apt) if apt else ["qemu-guest-agent"]
        try:
            debs = deb.fetch(packages, debs_dir, apt)
        except deb.PackageError:
            if not apt:
                raise
            # the private lists may name a file the mirror replaced: refresh once
            apt = foreign.prepare(root, spec.deb_arch, refresh=True)
            kernel_pkg = deb.resolve(spec.kernel_meta, apt)
            packages[0] = kernel_pkg
            debs = deb.fetch(packages, debs_dir, apt)
        init = _init_script()
        key = _key(debs, init, agent, arch)
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
            _write(tmp, debs, kernel_pkg, init, agent, say, t0, spec)
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
    spec: GuestArch,
) -> None:
    kfiles = deb.extract(
        debs[kernel_pkg],
        lambda p: (
            p.startswith("boot/vmlinuz-")
            or (p.startswith("lib/modules/") and modules_module.wanted_file(p.split("/", 3)[-1]))
        ),
    )
    vmlinuz = [p for p in kfiles if p.startswith("boot/vmlinuz-")]
    if not vmlinuz:
        raise GuestError(f"{debs[kernel_pkg].package.filename} holds no boot/vmlinuz-*")
    release = vmlinuz[0].removeprefix("boot/vmlinuz-")
    say(f"extracted kernel {release}")
    prefix = f"lib/modules/{release}/"
    mods = modules_module.select(
        {p.removeprefix(prefix): d for p, d in kfiles.items() if p.startswith(prefix)}
    )
    files = {
        "initramfs.cpio.gz": _initramfs(init, debs, release, mods, agent, spec),
        "vmlinuz": kfiles[vmlinuz[0]],
    }
    extra = {"kernel_package": kernel_pkg, "arch": spec.name}
    _save(out, files, extra, debs, release, mods, agent, t0)


def _save(
    out: str,
    files: dict[str, bytes],
    extra: dict[str, Any],
    debs: dict[str, deb.Deb],
    release: str,
    mods: list[modules_module.Module],
    agent: bool,
    t0: float,
) -> None:
    for name, data in files.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(
            {"kernel_release": release, **extra,
             "debs": {p: {"file": d.package.filename, d.package.hash_name: d.package.digest}
                      for p, d in debs.items()},
             "files": {name: _file_record(data) for name, data in files.items()},
             "modules": [m.path for m in mods], "agent": agent,
             "build_seconds": round(time.monotonic() - t0, 2)},
            f, indent=2,
        )  # fmt: skip


def _initramfs(
    init: str,
    debs: dict[str, deb.Deb],
    release: str,
    mods: list[modules_module.Module],
    agent: bool,
    spec: GuestArch,
) -> bytes:
    """The gzipped initramfs: busybox, /init, the modules with their indexes
    under lib/modules/RELEASE (so `modprobe` works), qemu-ga if `agent`."""
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
    for program, code in spec.programs.items():
        cpio.file(program, code, 0o755)
    cpio.file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", "root:x:0:\n")
    cpio.file("etc/udhcpc.script", UDHCPC_SCRIPT, 0o755)
    if mods:
        for m in mods:
            cpio.file(f"lib/modules/{release}/{m.path}", m.data)
        for name, text in modules_module.index(mods).items():
            cpio.file(f"lib/modules/{release}/{name}", text)
    if agent:
        libs = {
            p: x
            for p, x in debs.items()
            if p != "busybox-static" and not p.startswith("linux-image")
        }
        libs.pop("qemu-guest-agent")
        _add_agent(cpio, debs["qemu-guest-agent"], libs)
    return gzip.compress(cpio.getvalue(), compresslevel=6, mtime=0)


def _add_agent(cpio: CpioWriter, agent_deb: deb.Deb, lib_debs: dict[str, deb.Deb]) -> None:
    """qemu-ga and the libraries it links: the host's copies (they are
    dependencies of qemu-system-x86, so wherever QEMU runs they exist), or for
    another architecture those of its dependencies' packages (`lib_debs`).
    The libraries are read from qemu-ga's ELF headers: it is never run here."""
    qga = deb.extract(agent_deb, lambda p: p == "usr/sbin/qemu-ga").get("usr/sbin/qemu-ga")
    if qga is None:
        raise GuestError(f"{agent_deb.package.filename} holds no usr/sbin/qemu-ga")
    if lib_debs:
        files: dict[str, bytes] = {}
        for d in lib_debs.values():
            files.update(
                deb.extract(
                    d, lambda p: re.fullmatch(r"(usr/)?lib/[^/]+/[^/]+\.so[.\d]*", p) is not None
                )
            )
        for path, data in elf.packaged_libraries(qga, files).items():
            cpio.file(path, data, 0o755)
    for lib in [] if lib_debs else elf.host_libraries(qga):
        with open(os.path.realpath(lib), "rb") as f:
            cpio.file(lib, f.read(), 0o755)
    cpio.file("usr/sbin/qemu-ga", qga, 0o755)
    cpio.file("sbin/shutdown", SHUTDOWN_SHIM, 0o755)


def default(
    *, agent: bool = False, arch: str = "x86_64", progress: Progress | None = None
) -> GuestImage:
    """The bundled guest (with qemu-ga if `agent`) for `arch` ("x86_64" or
    "aarch64"), built on first use and cached."""
    return build(agent=agent, arch=arch, progress=progress)


def for_kernel(
    kernel: str | os.PathLike[str],
    modules: str | os.PathLike[str] | None = None,
    *,
    agent: bool = False,
    arch: str = "x86_64",
    cache: str | None = None,
    progress: Progress | None = None,
) -> GuestImage:
    """Your own kernel with the bundled userspace: a per-kernel initramfs
    (busybox, /init, and the guest's drivers from `modules`, the
    `INSTALL_MOD_PATH` of `make modules_install` or its lib/modules/RELEASE),
    cached by a hash of what goes in. Without `modules` the kernel must have
    what it needs built in (virtio, ...); the initramfs then has no modules."""
    say = progress or (lambda _msg: None)
    t0 = time.monotonic()
    kernel = os.path.abspath(os.fspath(kernel))
    if not os.access(kernel, os.R_OK):
        raise GuestError(f"kernel {kernel!r} does not exist or is unreadable")
    release, mods = "", []
    if modules is not None:
        release, files = modules_module.read_tree(os.fspath(modules))
        mods = modules_module.select(files)
        say(f"{len(mods)} modules of {release} for the guest")
    spec = guest_arch(arch)
    root = private.directory(cache or cache_root(), follow=True)
    kernels = os.path.join(root, "kernels")
    with private.locked(os.path.join(root, "guest.lock")), deb.remembered(root):
        private.directory(kernels)
        apt = foreign.prepare(root, spec.deb_arch) if arch != platform.machine() else []
        packages = ["busybox-static"]
        if agent:
            packages += deb.closure("qemu-guest-agent", apt) if apt else ["qemu-guest-agent"]
        debs = deb.fetch(packages, os.path.join(root, "debs"), apt)
        init = _init_script()
        blob = json.dumps(
            [_key(debs, init, agent, arch), release,
             [(m.path, hashlib.sha256(m.data).hexdigest()) for m in mods]]
        )  # fmt: skip
        final = os.path.join(kernels, hashlib.sha256(blob.encode()).hexdigest()[:16])
        if os.path.lexists(final):
            try:
                private.directory(final)
                return load(final, kernel)
            except (GuestError, OSError) as exc:
                say(f"not using the cached initramfs ({exc}): rebuilding it")
                _discard(final)
        tmp = tempfile.mkdtemp(prefix=".build-", dir=kernels)
        try:
            files = {"initramfs.cpio.gz": _initramfs(init, debs, release, mods, agent, spec)}
            extra = {"modules_from": os.fspath(modules or ""), "arch": spec.name}
            _save(tmp, files, extra, debs, release, mods, agent, t0)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        say(f"initramfs for {kernel} built in {time.monotonic() - t0:.1f} s: {final}")
        return load(final, kernel)


def clean(cache: str | None = None) -> list[str]:
    """Remove every cached guest build, downloaded package and private apt
    directory (another architecture's lists); returns what went."""
    root = cache or cache_root()
    removed = []
    arches = (
        sorted(n for n in os.listdir(root) if n.startswith("apt-")) if os.path.isdir(root) else []
    )
    for sub in ("guest", "kernels", "debs", *arches):
        path = os.path.join(root, sub)
        if os.path.lexists(path):
            _discard(path)  # a symlink goes, never what it points to
            removed.append(path)
    return removed
