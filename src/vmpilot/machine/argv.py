"""The QEMU command line, built in one place by one pure function.

Every value that comes from the user or the environment (a VM name, a drive
file, a temp dir path) goes into a `key=value` option through `escape`, and
every option names its key, never relying on QEMU's "implied" first key
(`-name process=evil` would set QEMU's process name, `-name guest=...` cannot).
Nothing else in vmpilot appends QEMU options.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from .config import ARCHES, MachineConfig, Share, escape, option_map, options, pairs

QMP_ID = "vmpilot-qmp"
QMP_UNIX_ID = "vmpilot-qmp-unix"
SERIAL_ID = "vmpilot-serial"
AGENT_ID = "vmpilot-qga"
NET_ID = "vmpilot-net"
MEMORY_ID = "vmpilot-mem"  # shared memory for virtiofs (vhost-user maps guest RAM)
# `-qtest chardev:ID` looks the chardev up by the name "qtest" whatever ID says
# (QEMU 7.2 aborts otherwise)
QTEST_ID = "qtest"


@dataclasses.dataclass(frozen=True)
class Wiring:
    """Where QEMU's channels go: fds it inherits (our socketpairs' far ends)
    and the unix socket it serves for other tools."""

    qmp_fd: int | None = None
    qmp_path: str | None = None  # expose_qmp: QMP also on this unix socket
    serial_fd: int | None = None
    qtest_fd: int | None = None
    agent_fd: int | None = None
    preset_fds: Sequence[tuple[int, int, str | None]] = ()  # (fd, fd set, opaque): -add-fd
    virtiofs_fds: Sequence[int] = ()  # one per share, connected to its virtiofsd; none: 9p

    @property
    def fds(self) -> list[int]:
        """Every fd QEMU must inherit."""
        chans = (self.qmp_fd, self.serial_fd, self.qtest_fd, self.agent_fd)
        preset = [fd for fd, _, _ in self.preset_fds]
        return [fd for fd in chans if fd is not None] + preset + list(self.virtiofs_fds)


def build_argv(
    config: MachineConfig, accel: str, wiring: Wiring = Wiring(), qemu: str | None = None
) -> list[str]:
    """QEMU's argv for `config` (validated by the caller) under `accel`, with
    the channels of `wiring`; `qemu` overrides `config.qemu` (a resolved path)."""
    cfg = config
    mem = f"{cfg.memory}M" if isinstance(cfg.memory, int) else cfg.memory
    argv = [qemu or cfg.qemu, "-nodefaults", "-no-user-config", "-display", "none"]
    virtiofs = bool(cfg.shares) and len(wiring.virtiofs_fds) == len(cfg.shares)
    backend = MEMORY_ID if virtiofs else None
    argv += ["-machine", options(None, type=cfg.machine, memory_backend=backend)]
    argv += ["-accel", options(None, accel=accel)]
    cpu = cfg.cpu or ("host" if accel == "kvm" else ARCHES[cfg.arch].cpu)
    if cpu is not None:
        argv += ["-cpu", cpu]
    argv += ["-smp", options(None, cpus=cfg.cpus), "-m", options(None, size=mem)]
    if virtiofs:
        argv += ["-object", options("memory-backend-memfd", id=MEMORY_ID, size=mem, share=True)]
    if cfg.name:
        argv += ["-name", options(None, guest=cfg.name)]
    # plain file names (QEMU opens them as they are; no option parsing)
    if cfg.bios is not None:
        argv += ["-bios", os.fspath(cfg.bios)]
    if cfg.kernel is not None:
        argv += ["-kernel", os.fspath(cfg.kernel)]
    if cfg.initrd is not None:
        argv += ["-initrd", os.fspath(cfg.initrd)]
    # the mount table for the bundled guest's /init (without -kernel there is
    # no command line to carry it: the guest mounts the tags `vmpilot<N>` itself)
    words = share_words(cfg.shares, virtiofs) if cfg.kernel is not None else []
    append = " ".join(filter(None, [cfg.append, *words]))
    if cfg.append is not None or append:
        argv += ["-append", append]
    if cfg.no_reboot:
        argv.append("-no-reboot")
    for drive in cfg.drives:
        argv += ["-drive", drive.arg()]
    for netdev in cfg.netdevs:
        argv += ["-netdev", netdev if isinstance(netdev, str) else option_map("netdev", netdev)]
    for dev in cfg.devices:
        argv += ["-device", dev if isinstance(dev, str) else option_map("device", dev)]
    if cfg.incoming:
        argv += ["-incoming", "defer"]  # the channel comes later, by fd (see migration.py)
    argv += _shares(cfg.shares, wiring.virtiofs_fds if virtiofs else None)
    if cfg.wants_net:
        argv += ["-netdev", netdev_user(cfg.forwards)]
        argv += ["-device", options("virtio-net-pci", netdev=NET_ID)]
    argv += list(cfg.extra_args)
    return argv + _channels(wiring)


def share_tag(index: int) -> str:
    return f"vmpilot{index}"


def _encode(path: str) -> str:
    """A path as one kernel command line word (the guest's init decodes `%XX`)."""
    safe = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789/._-")
    return "".join(chr(b) if chr(b) in safe else f"%{b:02X}" for b in path.encode())


def share_words(shares: Sequence[Share], virtiofs: bool) -> list[str]:
    """The mount table for the guest's init: `vmpilot.share=TYPE:TAG:MODE:PATH`."""
    kind = "virtiofs" if virtiofs else "9p"
    return [
        f"vmpilot.share={kind}:{share_tag(i)}:{'ro' if s.readonly else 'rw'}:{_encode(s.target)}"
        for i, s in enumerate(shares)
    ]


def _shares(shares: Sequence[Share], virtiofs_fds: Sequence[int] | None) -> list[str]:
    argv: list[str] = []
    for i, share in enumerate(shares):
        tag, fsid = share_tag(i), f"vmpilot-fs{i}"
        if virtiofs_fds is not None:
            argv += ["-chardev", options("socket", id=fsid, fd=virtiofs_fds[i])]
            argv += ["-device", options("vhost-user-fs-pci", chardev=fsid, tag=tag)]
        else:
            host = os.path.abspath(os.fspath(share.host_path))
            # these keys are spelt with '_' (`options` would write '-')
            fsdev = {"id": fsid, "path": host, "security_model": "none",
                     "readonly": share.readonly or None}  # fmt: skip
            argv += ["-fsdev", pairs("local", fsdev)]
            argv += ["-device", pairs("virtio-9p-pci", {"fsdev": fsid, "mount_tag": tag})]
    return argv


def netdev_user(forwards: Sequence[tuple[int, int]]) -> str:
    """User-mode networking; each forward listens on 127.0.0.1 only (port 0:
    the kernel picks a free one as QEMU binds it, read back with `info usernet`)."""
    rules = [f"hostfwd=tcp:127.0.0.1:{int(h)}-:{int(g)}" for h, g in forwards]
    return ",".join([options("user", id=NET_ID), *rules])


def _channels(w: Wiring) -> list[str]:
    argv: list[str] = []
    for fd, fdset, opaque in w.preset_fds:
        argv += ["-add-fd", options(None, fd=fd, set=fdset, opaque=opaque)]
    if w.qmp_fd is not None:
        argv += ["-chardev", options("socket", id=QMP_ID, fd=w.qmp_fd)]
        argv += ["-mon", options(None, chardev=QMP_ID, mode="control")]
    if w.qmp_path is not None:
        # `-qmp unix:PATH,...` cannot carry a `,` in PATH; a chardev's path= can
        argv += ["-chardev", options("socket", id=QMP_UNIX_ID, path=w.qmp_path,
                                     server=True, wait=False)]  # fmt: skip
        argv += ["-mon", options(None, chardev=QMP_UNIX_ID, mode="control")]
    if w.serial_fd is not None:
        argv += ["-chardev", options("socket", id=SERIAL_ID, fd=w.serial_fd)]
        argv += ["-serial", f"chardev:{SERIAL_ID}"]
    if w.qtest_fd is not None:
        argv += ["-chardev", options("socket", id=QTEST_ID, fd=w.qtest_fd)]
        argv += ["-qtest", f"chardev:{QTEST_ID}"]
    if w.agent_fd is not None:
        argv += ["-chardev", options("socket", id=AGENT_ID, fd=w.agent_fd)]
        argv += ["-device", options("virtio-serial-pci", id="vmpilot-vser")]
        argv += ["-device", options("virtserialport", chardev=AGENT_ID,
                                    name="org.qemu.guest_agent.0")]  # fmt: skip
    return argv


__all__ = ["Wiring", "build_argv", "escape"]
