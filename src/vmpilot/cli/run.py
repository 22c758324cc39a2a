"""`vmpilot run`: boot a VM; run one command in it, or get its console.

`vmpilot run [OPTIONS] -- CMD ARGS` boots the bundled guest (or your kernel
with the bundled userspace), runs CMD in it (in the current directory when it
is shared), streams its output here, powers off and exits with CMD's status:
255 if the guest kernel panicked, 254 if the guest ended (or QEMU died)
before CMD's status came. Input from a pipe goes to CMD's stdin; its end is
CMD's end of input.

Without CMD the guest's serial console is on this terminal in raw mode (keys
go to the guest, ^C included); `Ctrl-]` then `q` leaves: the VM is shut down
by the contract (graceful, then hard with a message). QMP is served to any
number of clients at once (`vmpilot qmp`, `vmpilot events`, qmp-shell,
scripts) on `--qmp PATH`, or on a socket in the VM's private temp dir.
`--arch aarch64` runs the bundled arm64 guest on QEMU's virt board.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import inspect
import os
import re
import secrets
import select
import shlex
import sys
import termios
import tty
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from .. import guest, machine
from ..errors import AbnormalShutdown, ConsoleClosed, GuestPanicked, VMError
from ..machine import Drive, Machine, MachineConfig
from ..machine.config import ARCHES

ESCAPE = b"\x1d"  # Ctrl-]
EOF_KEY = b"\x04"  # Ctrl-D: the guest tty's end of input (canonical mode)
PANIC_STATUS = 255  # the guest kernel panicked (as virtme-ng)
DIED_STATUS = 254  # the guest ended, or QEMU died, before CMD's status came
END_TIMEOUT = 60.0  # seconds the guest gets to power off once CMD is done
CMDLINE_MAX = 2000  # the kernel command line holds 2048 bytes on x86


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Iterator[bool]:
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# -- the VM's config from the options ------------------------------------------


def _unavailable(option: str) -> VMError:
    return VMError(f"{option} is not available in this vmpilot (its guest support is missing)")


def _has_field(name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(MachineConfig))


def _shares(specs: list[str]) -> list[Any]:
    share_cls = getattr(machine, "Share", None)
    if not specs:
        return []
    if share_cls is None or not _has_field("shares"):
        raise _unavailable("--share")
    shares = []
    for spec in specs:
        host, sep, where = spec.partition(":")
        shares.append(share_cls(os.path.abspath(host), where if sep else None))
    return shares


def _forward(spec: str) -> tuple[int, int]:
    host, sep, where = spec.partition(":")
    if not sep or not host.isdigit() or not where.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST_PORT:GUEST_PORT, not {spec!r}")
    return int(host), int(where)


def _drive(path: str) -> Drive:
    """A virtio-blk disk (the first is /dev/vda); qcow2 recognised by its magic."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise VMError(f"--drive {path}: {exc.strerror}") from exc
    return Drive(os.path.abspath(path), format="qcow2" if magic == b"QFI\xfb" else "raw")


def _guest_cwd(shares: list[Any]) -> str | None:
    """The host's cwd as the guest sees it, when a share holds it (as virtme-ng)."""
    cwd = os.getcwd()
    for share in shares:
        host = os.path.abspath(share.host_path)
        inside = os.path.join(share.guest_path or host, os.path.relpath(cwd, host))
        if cwd == host or cwd.startswith(host.rstrip("/") + "/"):
            return os.path.normpath(inside)
    return None


def _config(args: argparse.Namespace, options: str) -> MachineConfig:
    common: dict[str, Any] = {"name": "run"}
    for key in ("qemu", "accel", "memory", "cpus", "machine"):
        value = getattr(args, key)
        if value is not None:
            common[key] = value
    if args.qemu_arg:
        common["extra_args"] = list(args.qemu_arg)
    if args.drive:
        common["drives"] = [_drive(path) for path in args.drive]
    if args.share:
        common["shares"] = _shares(args.share)
    if args.net or args.forward:
        if not _has_field("net"):
            raise _unavailable("--net" if args.net else "--forward")
        common["net"] = True
        if args.forward:
            common["forwards"] = list(args.forward)
    if args.initrd:  # your own userspace: vmpilot's options mean nothing to it
        if not args.kernel:
            raise VMError("--initrd needs --kernel")
        if options:
            raise VMError("-- CMD needs the bundled userspace: drop --initrd")
        append = args.append or f"console={ARCHES[args.arch].console}"
        return MachineConfig(
            kernel=args.kernel, initrd=args.initrd, append=append, serial=True, arch=args.arch,
            **common,
        )  # fmt: skip
    image = guest.default(arch=args.arch)
    words = " ".join(w for w in (args.append, options) if w)
    if args.kernel:  # your kernel, the bundled userspace
        if not os.path.isfile(args.kernel):
            raise VMError(f"kernel file {args.kernel!r} does not exist")
        common["kernel"] = os.path.abspath(args.kernel)
    if args.modules:
        if "modules" not in inspect.signature(image.config).parameters:
            raise _unavailable("--modules")
        common["modules"] = os.path.abspath(args.modules)
    return image.config(options=words, **common)


# -- output that never raises BrokenPipeError ----------------------------------


class _Out:
    """Our stdout for the console's reader thread: a reader gone (`| head`)
    ends the writing, quietly (no BrokenPipe traceback, now or at exit)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.gone = False

    def write(self, data: bytes) -> None:
        if self.gone or not data:
            return
        try:
            self.stream.write(data)
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            self.gone = True
            with contextlib.suppress(OSError):  # Python's own flush at exit must not fail
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.stream.fileno())
                os.close(devnull)


def _say(text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        end = "\r\n" if sys.stderr.isatty() else "\n"  # a raw terminal needs the \r
        sys.stderr.write(text.replace("\n", end) + end)
        sys.stderr.flush()


# -- `-- CMD`: the script, and the stream of its output ------------------------


def _script(command: list[str], token: str, cwd: str | None) -> str:
    """What the guest runs (as `vmpilot.cmd`): markers around CMD, whose
    output passes untouched (`-opost`) and whose input is not echoed."""
    lines = ["stty -echo -opost 2>/dev/null", f"printf 'VMPRUN-B%s\\n' {token}"]
    if cwd is not None:
        lines.append(f"cd {shlex.quote(cwd)} || exit 1")
    lines.append(shlex.join(command))
    lines.append(f"printf 'VMPRUN-E%s %d\\n' {token} $?")  # right after CMD's last byte
    return "\n".join(lines) + "\n"


class _Stream:
    """Console bytes → CMD's output on our stdout, between the markers; a
    marker split across chunks is held back until it is whole."""

    def __init__(self, token: str, out: Callable[[bytes], None], wake: int) -> None:
        self.begin = f"VMPRUN-B{token}\n".encode()
        self.end = re.compile(rb"VMPRUN-E" + token.encode() + rb" (\d+)\n")
        self.out = out
        self.wake = wake  # a pipe: written when CMD starts and ends
        self.pending = b""
        self.started = False
        self.status: int | None = None
        self.prefix = b"VMPRUN-E" + token.encode() + b" "
        self.hold = len(self.prefix) + 4  # the marker up to its status (0-255)

    def feed(self, chunk: bytes) -> None:
        if self.status is not None:
            return
        self.pending += chunk
        if not self.started:
            at = self.pending.find(self.begin)
            if at < 0:
                self.pending = self.pending[-len(self.begin) :]
                return
            self.started = True
            self.pending = self.pending[at + len(self.begin) :]
            os.write(self.wake, b"b")
        m = self.end.search(self.pending)
        if m is not None:
            self.out(self.pending[: m.start()])
            self.status = int(m.group(1))
            self.pending = b""
            os.write(self.wake, b"e")
            return
        keep = self._partial_end()
        self.out(self.pending[: len(self.pending) - keep])
        self.pending = self.pending[len(self.pending) - keep :]

    def _partial_end(self) -> int:
        """How many trailing bytes may be the start of the end marker: only
        those wait for more; the rest (a line, a prompt) streams now."""
        for k in range(min(len(self.pending), self.hold), 0, -1):
            tail = self.pending[-k:]
            n = min(k, len(self.prefix))
            if tail[:n] == self.prefix[:n] and (k <= n or tail[n:].isdigit()):
                return k
        return 0

    def flush(self) -> None:
        """The guest ended without CMD's status: what was held back is output."""
        if self.started and self.status is None:
            self.out(self.pending)
            self.pending = b""


def _run_command(args: argparse.Namespace, command: list[str]) -> int:
    token = secrets.token_hex(8)
    shares = _shares(args.share)
    script = _script(command, token, _guest_cwd(shares))
    encoded = base64.b64encode(script.encode()).decode()
    if len(encoded) > CMDLINE_MAX - 200:
        raise VMError(f"the command is too long for the kernel command line ({len(encoded)} B)")
    vm = Machine(_config(args, f"vmpilot.cmd={encoded}"))
    out = _Out(sys.stdout.buffer)
    wake_r, wake_w = os.pipe()
    stream = _Stream(token, out.write, wake_w)
    try:
        vm.launch()
        console = vm.console
        console.follow(stream.feed)  # what came before, then every chunk: none missed or twice
        stdin = sys.stdin.fileno()
        with _raw_terminal(stdin) as raw:
            how = _pump_command(vm, stdin, raw, wake_r, stream)
        return _verdict(vm, stream, how)
    except BaseException:
        vm.kill()
        raise
    finally:
        os.close(wake_r)
        os.close(wake_w)


def _pump_command(vm: Machine, stdin: int, raw: bool, wake: int, stream: _Stream) -> str:
    """Input to CMD once it runs (never before: early input would be echoed
    or lost), until CMD's status comes or the VM ends."""
    pidfd = vm.pidfd
    reading, escaped, last = True, False, b"\n"
    while stream.status is None:
        fds = [pidfd, wake] + ([stdin] if reading and stream.started else [])
        ready, _, _ = select.select(fds, [], [], 3600)
        if wake in ready:
            os.read(wake, 64)
        if pidfd in ready:
            return "exited"
        if stdin not in ready or stream.status is not None:
            continue
        data = os.read(stdin, 4096)
        try:
            if not data:  # end of input: CMD reads EOF (^D ends a pending line first)
                reading = False
                vm.console.send(EOF_KEY if last.endswith(b"\n") else EOF_KEY * 2)
                continue
            last = data
            escaped, action = _type_keys(vm, data, raw, escaped)
            if action:
                return action
        except ConsoleClosed:
            return "exited"
    return "done"


def _type_keys(vm: Machine, data: bytes, raw: bool, escaped: bool) -> tuple[bool, str]:
    """Our keys to the guest; in raw mode `Ctrl-]` escapes are taken out.
    Returns (an escape pending, the action asked for or "")."""
    if not raw:
        vm.console.send(data)
        return escaped, ""
    keys, escaped, action = _escapes(data, escaped)
    if keys:
        vm.console.send(keys)
    return escaped, action


def _escapes(data: bytes, escaped: bool) -> tuple[bytes, bool, str]:
    """Keys to send, whether an escape is pending, and `quit`/`kill` if asked."""
    keys = b""
    for byte in data:
        b = bytes([byte])
        if escaped:
            escaped = False
            if b in (b"q", b"Q"):
                return keys, False, "quit"
            if b in (b"k", b"K"):
                return keys, False, "kill"
            keys += ESCAPE + b
        elif b == ESCAPE:
            escaped = True
        else:
            keys += b
    return keys, escaped, ""


def _verdict(vm: Machine, stream: _Stream, how: str) -> int:
    """CMD's status; 255 for a panic; 254 when the guest ended without it."""
    status, message = _ending(vm, stream, how)
    stream.flush()  # the VM is gone: what was held back is whole
    if message:
        _say(message)
    return status


def _ending(vm: Machine, stream: _Stream, how: str) -> tuple[int, str]:
    if how == "kill":
        vm.kill()
        return DIED_STATUS, "vmpilot: VM killed before the command finished"
    try:
        if how == "quit":
            vm.shutdown(method="quit")
        else:
            vm.wait(timeout=END_TIMEOUT)
    except GuestPanicked as exc:
        return PANIC_STATUS, f"vmpilot: the guest kernel panicked: {exc.panic or 'see above'}"
    except AbnormalShutdown as exc:
        return DIED_STATUS, f"vmpilot: the guest died: {str(exc).splitlines()[0]}"
    if stream.status is None:
        why = "stopped by you" if how == "quit" else f"QEMU exit code {vm.exit_code}"
        return DIED_STATUS, f"vmpilot: the guest ended before the command's status came ({why})"
    return stream.status, ""


# -- without CMD: the console on this terminal ---------------------------------


def run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if command:
        return _run_command(args, command)
    return _interactive(args)


def _interactive(args: argparse.Namespace) -> int:
    vm = Machine(_config(args, ""))
    vm.launch()
    try:
        assert vm.temp_dir is not None
        qmp_path = vm.serve_qmp(args.qmp or os.path.join(vm.temp_dir, "qmp.sock")).path
        out = _Out(sys.stdout.buffer)
        vm.console.listeners.append(out.write)
        stdin = sys.stdin.fileno()
        with _raw_terminal(stdin) as raw:
            _say(f"vmpilot: QEMU pid {vm.pid}, accel {vm.accel}; QMP: {qmp_path}")
            _say("vmpilot: Ctrl-] q quits (graceful shutdown), Ctrl-] k kills" if raw else
                 "vmpilot: end of input quits")  # fmt: skip
            how = _pump(vm, stdin, raw)
        if how == "kill":
            vm.kill()
            _say("vmpilot: VM killed")
            return 0
        if vm.state != "running":
            try:
                code = vm.wait(timeout=10)
            except GuestPanicked as exc:
                _say(f"vmpilot: the guest kernel panicked: {exc.panic or 'see the console'}")
                return PANIC_STATUS
            _say(f"vmpilot: the VM exited by itself (exit code {code})")
            return 0
        _say(f"vmpilot: shutting down ({args.shutdown}, up to {args.timeout:g} s; Ctrl-C kills)")
        try:
            vm.shutdown(method=args.shutdown, timeout=args.timeout)
        except AbnormalShutdown as exc:
            _say(f"vmpilot: graceful shutdown failed, QEMU was killed: {str(exc).splitlines()[0]}")
            return 1
        _say(f"vmpilot: shut down ({args.shutdown}), exit code {vm.exit_code}")
        return 0
    except BaseException:
        vm.kill()
        raise


def _pump(vm: Machine, stdin: int, raw: bool) -> str:
    """Forward keys to the guest until the escape, EOF, or the VM ends."""
    pidfd = vm.pidfd  # readable when QEMU exits
    escaped = False
    while True:
        ready, _, _ = select.select([stdin, pidfd], [], [], 3600)
        if pidfd in ready:
            return "exited"
        if stdin not in ready:
            continue
        data = os.read(stdin, 1024)
        if not data:
            return "quit"
        try:
            escaped, action = _type_keys(vm, data, raw, escaped)
            if action:
                return action
        except ConsoleClosed:
            return "exited"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="boot a VM: run a command in it (-- CMD ARGS), or get its console",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="vmpilot run [OPTIONS] [-- CMD [ARGS ...]]",
    )
    p.add_argument("--kernel", help="your kernel (bzImage); the bundled userspace unless --initrd")
    p.add_argument("--initrd", help="your initrd (with --kernel; then no -- CMD)")
    p.add_argument("--append", help="extra kernel command line words")
    p.add_argument(
        "--modules",
        metavar="DIR",
        help="modules for --kernel (make modules_install INSTALL_MOD_PATH=DIR)",
    )
    p.add_argument(
        "--share",
        action="append",
        default=[],
        metavar="HOST[:GUEST]",
        help="share a host directory (repeatable; GUEST defaults to HOST)",
    )
    p.add_argument(
        "--drive",
        action="append",
        default=[],
        metavar="FILE",
        help="a virtio-blk disk, raw or qcow2 (repeatable; the first is /dev/vda)",
    )
    p.add_argument("--net", action="store_true", help="user-mode networking")
    p.add_argument(
        "--forward",
        action="append",
        default=[],
        type=_forward,
        metavar="HOST:GUEST",
        help="forward a host TCP port (0: any) to the guest",
    )
    p.add_argument("--guest", choices=["default"], default="default",
                   help="the bundled guest (the default)")  # fmt: skip
    p.add_argument("--arch", choices=list(ARCHES), default="x86_64",
                   help="the guest's architecture: picks the bundled guest, QEMU binary, "
                   "board and CPU (default: x86_64)")  # fmt: skip
    p.add_argument("--qmp", metavar="PATH", help="serve QMP to any number of clients on this "
                   "unix socket (default: one in the VM's temp dir)")  # fmt: skip
    p.add_argument("--machine")
    p.add_argument("--memory", help="e.g. 512M")
    p.add_argument("--cpus", type=int)
    p.add_argument("--accel", help="kvm, tcg or auto")
    p.add_argument("--qemu", help="QEMU binary")
    p.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                   help="an extra QEMU argument (repeatable; --qemu-arg=-S)")  # fmt: skip
    p.add_argument("--shutdown", choices=["powerdown", "quit"], default="powerdown",
                   help="how to end the VM on quit (default: ACPI powerdown)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=30.0, help="graceful shutdown timeout (s)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS: run in the guest")
    p.set_defaults(func=run)
