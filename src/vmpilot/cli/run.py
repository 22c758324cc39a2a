"""`vmpilot run`: boot a VM with its serial console on this terminal.

The terminal is put in raw mode (keys go to the guest, ^C included);
`Ctrl-]` then `q` leaves: the VM is shut down by the contract (graceful, then
hard with a message). QMP is served to any number of clients at once
(`vmpilot qmp`, `vmpilot events`, qmp-shell, scripts) on `--qmp PATH`, or on
a socket in the VM's private temp dir.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
import termios
import tty
from collections.abc import Iterator
from typing import Any

from .. import guest
from ..errors import AbnormalShutdown, VMError
from ..machine import Machine, MachineConfig
from ..machine.config import ARCHES

ESCAPE = b"\x1d"  # Ctrl-]


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


def _config(args: argparse.Namespace) -> MachineConfig:
    extra = [a for a in args.extra if a != "--"]
    common: dict[str, Any] = {"name": "run"}
    for key in ("qemu", "accel", "memory", "cpus", "machine"):
        value = getattr(args, key)
        if value is not None:
            common[key] = value
    if args.kernel:
        common["arch"] = args.arch
        console = f"console={ARCHES[args.arch].console}"
        return MachineConfig(
            kernel=args.kernel, initrd=args.initrd, append=args.append or console,
            serial=True, extra_args=extra, **common,
        )  # fmt: skip
    if args.initrd or args.append:
        raise VMError("--initrd and --append need --kernel")
    image = guest.default(arch=args.arch)
    return image.config(extra_args=extra, **common)


def _say(text: str) -> None:
    sys.stderr.write(text.replace("\n", "\r\n") + "\r\n")
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    config = _config(args)
    vm = Machine(config)
    vm.launch()
    try:
        assert vm.temp_dir is not None
        qmp_path = vm.serve_qmp(args.qmp or os.path.join(vm.temp_dir, "qmp.sock")).path
        out = sys.stdout.buffer
        vm.console.listeners.append(lambda chunk: (out.write(chunk), out.flush()))
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
            code = vm.wait(timeout=10)
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
        if raw:
            for byte in data:
                b = bytes([byte])
                if escaped:
                    escaped = False
                    if b in (b"q", b"Q"):
                        return "quit"
                    if b in (b"k", b"K"):
                        return "kill"
                    vm.console.send(ESCAPE + b)
                elif b == ESCAPE:
                    escaped = True
                else:
                    vm.console.send(b)
        else:
            vm.console.send(data)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="boot a VM with its console on this terminal",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--kernel", help="kernel image (default: the bundled guest)")
    p.add_argument("--initrd", help="initrd (with --kernel)")
    p.add_argument("--append", help="kernel command line (with --kernel)")
    p.add_argument("--guest", choices=["default"], default="default",
                   help="the bundled guest (the default when no --kernel)")  # fmt: skip
    p.add_argument("--arch", choices=list(ARCHES), default="x86_64",
                   help="the guest's architecture: picks the bundled guest, QEMU binary, "
                   "board and CPU (default: x86_64)")  # fmt: skip
    p.add_argument("--machine")
    p.add_argument("--memory", help="e.g. 512M")
    p.add_argument("--cpus", type=int)
    p.add_argument("--accel", help="kvm, tcg or auto")
    p.add_argument("--qemu", help="QEMU binary")
    p.add_argument("--qmp", metavar="PATH", help="serve QMP to any number of clients on this "
                   "unix socket (default: one in the VM's temp dir)")  # fmt: skip
    p.add_argument("--shutdown", choices=["powerdown", "quit"], default="powerdown",
                   help="how to end the VM on quit (default: ACPI powerdown)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=30.0, help="graceful shutdown timeout (s)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- extra QEMU arguments")
    p.set_defaults(func=run)
