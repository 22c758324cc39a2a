"""`vmpilot demo`: launch a VM, talk to it over QMP, shut it down by the
contract, and say how long each phase took."""

from __future__ import annotations

import argparse
import json
import time

from ..machine import Machine


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="launch a VM, talk to it, shut it down",
        description="Launch a QEMU VM (-machine none), query it over QMP, watch events, "
        "and shut it down gracefully, timing each phase.",
    )
    p.add_argument("--qemu", help="QEMU binary (default: $VMPILOT_QEMU or qemu-system-x86_64)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    kw = {"qemu": args.qemu} if args.qemu else {}
    phases: list[tuple[str, float]] = []
    t = time.perf_counter()
    vm = Machine(machine="none", memory=32, name="demo", **kw)
    with vm:
        phases.append(("launch → QMP ready", time.perf_counter() - t))
        print(f"launched QEMU pid {vm.pid} (accel {vm.accel}: {vm.accel_reason})")
        t = time.perf_counter()
        version = vm.execute("query-version")["qemu"]
        status = vm.execute("query-status")
        print(
            f"QEMU {version['major']}.{version['minor']}.{version['micro']}, "
            f"status: {json.dumps(status)}"
        )
        vm.execute("stop")
        stop = vm.wait_event("STOP", timeout=5)
        vm.execute("cont")
        resume = vm.wait_event("RESUME", timeout=5)
        print(
            f"events: {stop.name} at {stop.timestamp:.6f}, {resume.name} at {resume.timestamp:.6f}"
        )
        n = 200
        t2 = time.perf_counter()
        for _ in range(n):
            vm.execute("query-status")
        rt = (time.perf_counter() - t2) / n
        print(f"{n} query-status round trips: {rt * 1e6:.0f} µs each")
        phases.append(("talk (QMP)", time.perf_counter() - t))
        t = time.perf_counter()
    phases.append(("shutdown (quit) → reaped", time.perf_counter() - t))
    print(f"shut down: state {vm.state}, exit code {vm.exit_code}")
    for name, seconds in phases:
        print(f"  {name:<26} {seconds * 1e3:8.1f} ms")
    return 0
