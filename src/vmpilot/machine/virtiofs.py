"""Host directories for the guest (`MachineConfig.shares`): virtiofs through a
virtiofsd the Machine starts, owns and reaps, or QEMU's built-in 9p server
where no virtiofsd is installed.

virtiofs is the transport of choice: page-cache coherent, fast, and the only
one Debian's cloud kernel (the bundled guest's) can mount; it has no 9p at
all. But it needs a daemon next to QEMU. Debian 12's QEMU 7.2 ships the C one
at /usr/lib/qemu/virtiofsd; newer distributions ship the Rust one as the
`virtiofsd` package (/usr/libexec/virtiofsd). Where neither is, 9p is the
fallback: QEMU serves it itself (no daemon, nothing to own) and every
general-purpose kernel has it (CONFIG_9P_FS, CONFIG_NET_9P_VIRTIO); with the
cloud kernel the guest then reports the share as unmountable.

A virtiofsd is spawned through `process.spawn` (its own session, the death
signal checked: it dies with the controller, even on SIGKILL) with a
listening socket we made (`--fd`), to which we have already connected the
end QEMU gets (`-chardev socket,fd=`): the socket's path is unlinked before
either process starts, so nothing else can ever connect to it. It exits by
itself when QEMU closes its end; the Machine's post-shutdown step reaps it
(and kills it if it did not).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Sequence

from ..errors import LaunchError
from . import process
from .config import Share

# (path, flavour): the Rust daemon (Debian 13, Fedora) first, then QEMU 7.2's C one
KNOWN = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")
EXIT_GRACE = 2.0  # after QEMU is gone: how long virtiofsd gets to notice and exit
KILL_TIMEOUT = 10.0


def find_virtiofsd() -> str | None:
    """The virtiofsd to use: `$VMPILOT_VIRTIOFSD` (empty or `none`: use 9p),
    else one on PATH or in the distributions' places; None when there is none."""
    env = os.environ.get("VMPILOT_VIRTIOFSD")
    if env is not None:
        return None if env in ("", "none") else shutil.which(env)
    found = shutil.which("virtiofsd")
    if found:
        return found
    return next((p for p in KNOWN if os.access(p, os.X_OK)), None)


def transport() -> str:
    """`virtiofs` where a virtiofsd is installed, else `9p` (see the module doc)."""
    return "virtiofs" if find_virtiofsd() else "9p"


@functools.lru_cache(maxsize=4)
def _is_rust(binary: str) -> bool:
    try:
        out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--shared-dir" in out.stdout + out.stderr


def command(binary: str, share: Share, fd: int, rust: bool) -> list[str]:
    """virtiofsd's argv for `share`, serving the listening socket `fd`."""
    host = os.path.abspath(os.fspath(share.host_path))
    if rust:
        sandbox = "namespace" if os.geteuid() == 0 else "none"
        argv = [binary, f"--fd={fd}", "--shared-dir", host, "--cache", "auto",
                "--sandbox", sandbox]  # fmt: skip
        return argv + (["--readonly"] if share.readonly else [])
    # the C daemon has no read-only mode: the guest mounts the share read-only.
    # Its -o parser splits on commas; a backslash escapes one.
    source = host.replace("\\", "\\\\").replace(",", "\\,")
    return [binary, f"--fd={fd}", "-o", f"source={source}", "-o", "cache=auto"]


class Virtiofsd:
    """One virtiofsd serving one share. `qemu_fd` is the connected socket end
    QEMU gets; `close()` reaps the daemon (killing it if it is still there)."""

    def __init__(self, binary: str, share: Share, rundir: str, index: int, log_path: str) -> None:
        self.log_path = log_path
        self._kept_log: str | None = None
        dirfd = os.open(rundir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._qemu_end = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        log_fd = -1
        try:
            # bound through the dir's fd: a deep temp dir cannot exceed sun_path's 108 bytes
            path = f"/proc/self/fd/{dirfd}/virtiofs-{index}.sock"
            listener.bind(path)
            listener.listen(1)
            self._qemu_end.connect(path)  # queued until virtiofsd accepts it
            os.unlink(os.path.join(rundir, f"virtiofs-{index}.sock"))  # nobody else can connect
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            argv = command(binary, share, listener.fileno(), _is_rust(binary))
            self.proc = process.spawn(argv, [listener.fileno()], log_fd)
        except OSError as exc:
            self._qemu_end.close()
            raise LaunchError(f"cannot start virtiofsd for {share.host_path!r}: {exc}") from exc
        finally:
            listener.close()  # virtiofsd has its copy
            os.close(dirfd)
            if log_fd >= 0:
                os.close(log_fd)

    @property
    def qemu_fd(self) -> int:
        return self._qemu_end.fileno()

    def release_qemu_end(self) -> None:
        """QEMU has its copy now (or will never get it)."""
        self._qemu_end.close()

    @property
    def log(self) -> str:
        """What virtiofsd printed (tail); kept after `close()`."""
        if self._kept_log is not None:
            return self._kept_log
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def close(self) -> None:
        """After QEMU is gone: let virtiofsd exit (its sandbox child first: it
        waits for it), else kill its process group while it is unreaped (so
        the group id cannot be anyone else's), then reap it."""
        self.release_qemu_end()
        try:
            self.proc.wait(EXIT_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(KILL_TIMEOUT)
        self._kept_log = self.log  # its file goes with the Machine's temp dir


def start_all(shares: Sequence[Share], rundir: str) -> list[Virtiofsd]:
    """One virtiofsd per share (all or none: on failure, those started are reaped)."""
    binary = find_virtiofsd()
    if binary is None:
        return []
    daemons: list[Virtiofsd] = []
    try:
        for i, share in enumerate(shares):
            log_path = os.path.join(rundir, f"virtiofsd-{i}.log")
            daemons.append(Virtiofsd(binary, share, rundir, i, log_path))
    except BaseException:
        for d in daemons:
            d.close()
        raise
    return daemons
