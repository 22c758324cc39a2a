"""A declarative description of one VM, turned into a QEMU argv.

Everything the user gives is checked here, before QEMU runs, and every value
placed inside a QEMU option string is escaped (`,` doubled) so that a file
name like `a,b=c` can never add an option. No shell is involved anywhere.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError as ConfigError  # defined with every error, in errors.py
from ..errors import LaunchError

log = logging.getLogger("vmpilot.machine")

ACCELS = ("auto", "kvm", "tcg", "qtest", "xen", "hvf", "whpx")
_MEMORY = re.compile(r"^\d+(\.\d+)?[KMGT]?$", re.IGNORECASE)
_KEY = re.compile(r"^[A-Za-z0-9_.-]+$")
_MACHINE = re.compile(r"^[A-Za-z0-9_.-]+$")
_CPU = re.compile(r"^[A-Za-z0-9_.-]+$")  # a model name only: its properties go in extra_args


def escape(value: object) -> str:
    """Make `value` safe inside a QEMU `key=value,...` option string."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if "\n" in text or "\0" in text:
        raise ConfigError(f"option value {text!r} contains a newline or NUL byte")
    return text.replace(",", ",,")


def options(head: str | None = None, **values: object) -> str:
    """`head,key=value,...` with every value escaped; None values are left out.
    Keys are ours (Python names, `_` → `-`), never the user's."""
    return pairs(head, {key.replace("_", "-"): value for key, value in values.items()})


def pairs(head: str | None, values: Mapping[str, object]) -> str:
    """`head,key=value,...` for keys that are not Python names (`file.driver`)."""
    parts = [] if head is None else [escape(head)]
    for key, value in values.items():
        if value is None:
            continue
        parts.append(f"{key}={escape(_bool(value))}")
    return ",".join(parts)


def option_map(what: str, spec: Mapping[str, Any]) -> str:
    items = dict(spec)
    for key in items:
        if not isinstance(key, str) or not _KEY.match(key):
            raise ConfigError(f"invalid {what} option name {key!r}")
    head_key = "driver" if what == "device" else "type"
    head = items.pop(head_key, None)
    if head is None:
        raise ConfigError(f"a {what} given as a mapping needs a {head_key!r} key: {spec!r}")
    return ",".join([escape(head), *(f"{k}={escape(_bool(v))}" for k, v in items.items())])


def _bool(value: object) -> object:
    return ("on" if value else "off") if isinstance(value, bool) else value


@dataclasses.dataclass(frozen=True)
class Drive:
    """A disk image. Any file name is safe: it is escaped, and it always goes
    to QEMU's `file` protocol driver, so a name like `nbd:host:port` or
    `json:{...}` is a local file of that name, never a protocol to parse."""

    file: str | os.PathLike[str]
    format: str = "raw"
    interface: str = "virtio"
    id: str | None = None
    snapshot: bool = False
    readonly: bool = False

    def arg(self) -> str:
        """The `-drive` value: a format node over an explicit `file` node."""
        return pairs(
            None,
            {
                "file.driver": "file",
                "file.filename": os.fspath(self.file),
                "format": self.format,
                "if": self.interface,
                "id": self.id,
                "snapshot": self.snapshot or None,
                "readonly": self.readonly or None,
            },
        )


@dataclasses.dataclass(frozen=True)
class Share:
    """A host directory the guest sees at `guest_path` (default: the same
    path as on the host). Served by virtiofs where a virtiofsd is installed,
    else by QEMU's own 9p server (see `virtiofs.transport`); the bundled
    guest mounts each at boot (read-only when `readonly`)."""

    host_path: str | os.PathLike[str]
    guest_path: str | None = None
    readonly: bool = False

    @property
    def target(self) -> str:
        """Where the guest mounts it."""
        return self.guest_path or os.path.abspath(os.fspath(self.host_path))


@dataclasses.dataclass(frozen=True)
class Arch:
    """What a guest architecture needs of QEMU when the config does not say."""

    name: str  # the guest's `uname -m`
    qemu: str  # the binary
    package: str  # the Debian package that has it
    env: str  # the environment variable naming another binary
    machine: str
    cpu: str | None  # the CPU model under TCG (None: QEMU's default); KVM uses `host`
    console: str  # the kernel's name for the port `-serial` feeds


ARCHES = {
    "x86_64": Arch("x86_64", "qemu-system-x86_64", "qemu-system-x86", "VMPILOT_QEMU", "q35",
                   None, "ttyS0"),
    # virt's default CPU is a 32-bit cortex-a15; cortex-a57 is 64-bit and
    # cheaper to emulate than `max`. Its -serial is the PL011: ttyAMA0.
    "aarch64": Arch("aarch64", "qemu-system-aarch64", "qemu-system-arm", "VMPILOT_QEMU_AARCH64",
                    "virt", "cortex-a57", "ttyAMA0"),
}  # fmt: skip


def arch_of(name: str) -> Arch:
    try:
        return ARCHES[name]
    except KeyError:
        raise ConfigError(f"arch {name!r} is not one of {', '.join(ARCHES)}") from None


def default_qemu(arch: str = "x86_64") -> str:
    """The QEMU binary for `arch`: $VMPILOT_QEMU (x86_64) or
    $VMPILOT_QEMU_AARCH64 (aarch64) when set, else the one on PATH."""
    a = arch_of(arch)
    return os.environ.get(a.env) or a.qemu


def detect_accel() -> tuple[str, str]:
    """Pick kvm only where /dev/kvm opens read-write and is real KVM (not the
    `kvm_pvm` nested backend, under which Linux guests hang), else tcg."""
    if os.path.exists("/sys/module/kvm_pvm"):
        return "tcg", "/dev/kvm is kvm_pvm (nested PVM; Linux guests hang under it)"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return "tcg", f"/dev/kvm not usable ({exc.strerror})"
    os.close(fd)
    if not any(os.path.exists(f"/sys/module/{m}") for m in ("kvm_intel", "kvm_amd")):
        return "tcg", "/dev/kvm is not backed by kvm_intel or kvm_amd"
    return "kvm", "/dev/kvm opens read-write and is kvm_intel/kvm_amd"


@dataclasses.dataclass
class MachineConfig:
    """What to run. `to_argv()` gives the command line (without the QMP and
    console wiring, which `Machine` adds on its own socketpairs); both come
    from `argv.build_argv`, the one place that writes QEMU options."""

    # None: the arch's default (filled in at once: default_qemu(arch); q35, virt)
    qemu: str = None  # type: ignore[assignment]
    machine: str = None  # type: ignore[assignment]
    accel: str = "auto"
    cpus: int = 1
    memory: str | int = "256M"
    kernel: str | os.PathLike[str] | None = None
    initrd: str | os.PathLike[str] | None = None
    append: str | None = None
    bios: str | os.PathLike[str] | None = None
    drives: Sequence[Drive] = ()
    devices: Sequence[str | Mapping[str, Any]] = ()
    netdevs: Sequence[str | Mapping[str, Any]] = ()
    shares: Sequence[Share] = ()  # host directories (virtiofs, else 9p); see `Share`
    forwards: Sequence[tuple[int, int]] = ()  # (host port or 0, guest port), TCP on 127.0.0.1
    net: bool = False  # a virtio-net NIC on user-mode networking (implied by `forwards`)
    serial: bool = False
    agent: bool = False  # a virtio-serial port for qemu-ga on a socketpair (vm.agent)
    qtest: bool = False  # a qtest channel on a socketpair (see vmpilot.qtest.QtestMachine)
    no_reboot: bool = False
    name: str | None = None
    log_dir: str | None = None  # keep qemu.log / console.log in a subdir of this
    expose_qmp: bool = False  # also serve QMP on a unix socket (vm.qmp_path) for other tools
    incoming: bool = False  # wait for a migration (`-incoming defer`): the target of migrate()
    snapshots: bool = False  # vm.snapshot_*: a qcow2 state disk in the temp dir, made on first use
    extra_args: Sequence[str] = ()
    arch: str = "x86_64"  # the guest's architecture: picks the defaults above (see ARCHES)
    cpu: str | None = None  # None: `host` under KVM, else the arch's default

    def __post_init__(self) -> None:
        if self.arch in ARCHES:  # else validate() says what is wrong
            if self.qemu is None:
                self.qemu = default_qemu(self.arch)
            if self.machine is None:
                self.machine = ARCHES[self.arch].machine

    def resolve_accel(self) -> tuple[str, str]:
        """The accelerator to use and why."""
        if self.accel != "auto":
            return self.accel, "asked for in the config"
        env = os.environ.get("VMPILOT_ACCEL")
        if env:
            if env not in ACCELS:
                raise ConfigError(f"VMPILOT_ACCEL={env!r} is not one of {', '.join(ACCELS)}")
            if env != "auto":
                return env, "VMPILOT_ACCEL"
        host = platform.machine()
        if self.arch != host:
            return "tcg", f"an {self.arch} guest on an {host} host"
        return detect_accel()

    def resolve_qemu(self) -> str:
        path = shutil.which(self.qemu)
        if path is None:
            a = arch_of(self.arch)
            hint = (
                f"install it (Debian: apt-get install {a.package}) or set {a.env}"
                if os.sep not in self.qemu
                else "check the path"
            )
            raise LaunchError(f"QEMU binary {self.qemu!r} not found or not executable; {hint}")
        return path

    def validate(self) -> None:
        arch_of(self.arch)
        if self.cpu is not None and (not isinstance(self.cpu, str) or not _CPU.fullmatch(self.cpu)):
            raise ConfigError(f"invalid CPU model {self.cpu!r}: one name like 'cortex-a57'")
        if not isinstance(self.machine, str) or not _MACHINE.fullmatch(self.machine):
            # no machine type has these; refusing beats QEMU's "unsupported machine type"
            raise ConfigError(
                f"invalid machine type {self.machine!r}: one name like 'q35' or 'pc-q35-7.2'"
            )
        if self.name is not None and not isinstance(self.name, str):
            raise ConfigError(f"name must be a string, not {self.name!r}")
        if self.accel not in ACCELS:
            raise ConfigError(f"accel {self.accel!r} is not one of {', '.join(ACCELS)}")
        if isinstance(self.cpus, bool) or not isinstance(self.cpus, int) or self.cpus < 1:
            raise ConfigError(f"cpus must be a positive int, not {self.cpus!r}")
        mem = self.memory
        if isinstance(mem, bool) or (isinstance(mem, int) and mem < 1):
            raise ConfigError(f"memory must be MiB (int > 0) or a size like '256M', not {mem!r}")
        if isinstance(mem, str) and not _MEMORY.match(mem):
            raise ConfigError(f"memory {mem!r} is not a size like '256M' or '1G'")
        for what in ("kernel", "initrd", "bios"):
            path = getattr(self, what)
            if path is not None and not os.access(path, os.R_OK):
                raise ConfigError(
                    f"{what} file {os.fspath(path)!r} does not exist or is unreadable"
                )
        if self.initrd is not None and self.kernel is None:
            raise ConfigError("initrd given without a kernel")
        if self.append is not None and self.kernel is None:
            raise ConfigError("append (kernel command line) given without a kernel")
        for drive in self.drives:
            if not isinstance(drive, Drive):
                raise ConfigError(f"drives must be Drive objects, not {drive!r}")
            if not os.path.exists(drive.file):
                raise ConfigError(f"drive file {os.fspath(drive.file)!r} does not exist")
        self._validate_shares()
        self._validate_forwards()
        if isinstance(self.extra_args, str):
            raise ConfigError("extra_args must be a list of arguments, not one string")
        for arg in self.extra_args:
            if not isinstance(arg, str):
                raise ConfigError(f"extra_args must be strings, not {arg!r}")

    def _validate_shares(self) -> None:
        targets: set[str] = set()
        for share in self.shares:
            if not isinstance(share, Share):
                raise ConfigError(f"shares must be Share objects, not {share!r}")
            host = os.fspath(share.host_path)
            if not os.path.isdir(host):
                raise ConfigError(f"shared directory {host!r} does not exist")
            target = share.target
            if not target.startswith("/") or any(c in target for c in "\0\n"):
                raise ConfigError(f"guest path {target!r} must be absolute, one line")
            if os.path.normpath(target) == "/":
                raise ConfigError(f"a share cannot be mounted over the guest's root: {share!r}")
            if target in targets:
                raise ConfigError(f"two shares are mounted at {target!r}")
            targets.add(target)

    def _validate_forwards(self) -> None:
        guests: set[int] = set()
        for fwd in self.forwards:
            ok = isinstance(fwd, (tuple, list)) and len(fwd) == 2
            ports = list(fwd) if ok else []
            if not ok or any(isinstance(p, bool) or not isinstance(p, int) for p in ports):
                raise ConfigError(f"a forward is (host_port, guest_port), not {fwd!r}")
            host, guest = ports
            if not 0 <= host <= 65535 or not 1 <= guest <= 65535:
                raise ConfigError(f"forward {fwd!r}: host port 0-65535 (0: any), guest 1-65535")
            if guest in guests:
                raise ConfigError(f"guest port {guest} is forwarded twice")
            guests.add(guest)

    @property
    def wants_net(self) -> bool:
        """A user-mode NIC is configured (`net=True` or any forward)."""
        return bool(self.net or self.forwards)

    def to_argv(self, accel: str | None = None) -> list[str]:
        """Validate and build the argv (without the channel wiring, which
        `Machine` adds); `accel` overrides the resolved one."""
        from .argv import build_argv

        self.validate()
        return build_argv(self, accel or self.resolve_accel()[0])
