"""`vmpilot demo`: build (or reuse) the bundled guest, boot it, run a command
on its console, query it over QMP, power it down, and time each phase."""

from __future__ import annotations

import argparse
import json

from .. import guest
from .._util.progress import Progress
from ..machine import Machine
from ..machine.config import ARCHES


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="boot the bundled guest, talk to it, power it down",
        description="Build (or reuse) the bundled Linux guest, boot it, run a command over "
        "the serial console, query QMP, and shut down gracefully by the power button (ACPI on "
        "x86, a GPIO line on aarch64's virt board), "
        "printing how long each phase took.",
    )
    p.add_argument(
        "--arch",
        choices=list(ARCHES),
        default="x86_64",
        help="the guest's architecture (default: x86_64; aarch64 runs under TCG)",
    )
    p.add_argument("--qemu", help="QEMU binary (default: $VMPILOT_QEMU or qemu-system-x86_64; "
                   "aarch64: $VMPILOT_QEMU_AARCH64 or qemu-system-aarch64)")  # fmt: skip
    p.add_argument("--accel", help="accelerator (default: auto: KVM only where it is real KVM)")
    p.add_argument("--command", default="uname -a", help="command to run in the guest")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    progress = Progress()
    with progress.phase("guest build (cached after the first run)"):
        image = guest.default(arch=args.arch)
    print(f"guest: Linux {image.kernel_release}, {image.path}")
    overrides = {k: v for k, v in (("qemu", args.qemu), ("accel", args.accel)) if v}
    vm = Machine(image.config(name="demo", **overrides))
    with progress.phase("boot to the shell prompt"):
        vm.launch()
        vm.shell.wait_ready(timeout=180)
    try:
        print(f"booted: QEMU pid {vm.pid}, accel {vm.accel} ({vm.accel_reason})")
        with progress.phase("console command"):
            status, output = vm.shell.run(args.command, timeout=60)
        print(f"guest$ {args.command}  (exit status {status})")
        print(output.rstrip())
        with progress.phase("QMP queries"):
            run_state = vm.execute("query-status")
            cpus = vm.execute("query-cpus-fast")
        print(f"query-status: {json.dumps(run_state)}")
        print(
            f"query-cpus-fast: {len(cpus)} vCPU(s): "
            + ", ".join(f"#{c['cpu-index']} thread {c['thread-id']} ({c['target']})" for c in cpus)
        )
        button = "ACPI power-down" if args.arch == "x86_64" else "GPIO power button"
        with progress.phase(f"{button} → QEMU exit"):
            vm.shutdown(method="powerdown", timeout=60)
    except BaseException:
        vm.kill()
        raise
    print(f"powered off: exit code {vm.exit_code}")
    print("phases:")
    for name, seconds in progress.timings:
        print(f"  {name:<44} {seconds:7.2f} s")
    return 0
