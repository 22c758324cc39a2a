"""VM lifecycle cost: launch→ready and shutdown→reaped, vmpilot vs. by hand.

    python bench/lifecycle.py [-n 20] [--fleet 32]

(a) raw subprocess.Popen + socketpair + greeting/negotiation by hand (the floor),
(b) Machine, (c) AsyncMachine, (d) the compat shim's QEMUMachine, all
`-machine none`, interleaved; then a fleet
of AsyncMachines launched and shut down concurrently vs. one after another.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

from vmpilot import AsyncMachine, Machine
from vmpilot.compat.machine import QEMUMachine

QEMU = os.environ.get("VMPILOT_QEMU") or shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
BASE = [
    QEMU,
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-machine",
    "none",
    "-accel",
    "tcg",
    "-m",
    "32M",
]


def raw() -> tuple[float, float]:
    t0 = time.perf_counter()
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [*BASE, "-chardev", f"socket,id=q,fd={theirs.fileno()}", "-mon", "chardev=q,mode=control"],
        pass_fds=[theirs.fileno()],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    theirs.close()
    f = ours.makefile("rb")
    f.readline()
    ours.sendall(b'{"execute":"qmp_capabilities","id":1}\n')
    f.readline()
    t1 = time.perf_counter()
    ours.sendall(b'{"execute":"quit","id":2}\n')
    proc.wait()
    t2 = time.perf_counter()
    f.close()
    ours.close()
    return t1 - t0, t2 - t1


def sync_machine() -> tuple[float, float]:
    t0 = time.perf_counter()
    vm = Machine(machine="none", accel="tcg", memory=32, qemu=QEMU).launch()
    t1 = time.perf_counter()
    vm.shutdown()
    return t1 - t0, time.perf_counter() - t1


def async_machine() -> tuple[float, float]:
    async def main() -> tuple[float, float]:
        t0 = time.perf_counter()
        vm = await AsyncMachine(machine="none", accel="tcg", memory=32, qemu=QEMU).launch()
        t1 = time.perf_counter()
        await vm.shutdown()
        return t1 - t0, time.perf_counter() - t1

    return asyncio.run(main())


def compat_machine() -> tuple[float, float]:
    t0 = time.perf_counter()
    vm = QEMUMachine(QEMU, BASE[1:], base_temp_dir=tempfile.gettempdir())
    vm.launch()
    t1 = time.perf_counter()
    vm.shutdown()
    return t1 - t0, time.perf_counter() - t1


async def fleet(n: int, concurrent: bool) -> float:
    vms = [AsyncMachine(machine="none", accel="tcg", memory=32, qemu=QEMU) for _ in range(n)]
    t0 = time.perf_counter()
    if concurrent:
        await asyncio.gather(*(vm.launch() for vm in vms))
        await asyncio.gather(*(vm.shutdown() for vm in vms))
    else:
        for vm in vms:
            await vm.launch()
            await vm.shutdown()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20, help="cycles per contender")
    ap.add_argument("--fleet", type=int, default=32)
    args = ap.parse_args()
    rows = [
        ("raw Popen + socketpair (floor)", raw),
        ("Machine", sync_machine),
        ("AsyncMachine", async_machine),
        ("compat QEMUMachine", compat_machine),
    ]
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in rows}
    for _name, fn in rows:  # warm-up
        fn()
    for _ in range(args.n):
        for name, fn in rows:
            samples[name].append(fn())
    floor_l = statistics.median(s[0] for s in samples[rows[0][0]])
    floor_s = statistics.median(s[1] for s in samples[rows[0][0]])
    print(f"-machine none, TCG, median of {args.n} cycles")
    print("| how | launch→ready | vs floor | shutdown→reaped | vs floor |")
    print("|---|---|---|---|---|")
    for name, _ in rows:
        lm = statistics.median(s[0] for s in samples[name])
        sm = statistics.median(s[1] for s in samples[name])
        print(
            f"| {name} | {lm * 1e3:.1f} ms | {(lm - floor_l) * 1e3:+.1f} ms "
            f"| {sm * 1e3:.1f} ms | {(sm - floor_s) * 1e3:+.1f} ms |"
        )
    seqs, concs = [], []
    for _ in range(3):  # interleaved, median of 3
        seqs.append(asyncio.run(fleet(args.fleet, False)))
        concs.append(asyncio.run(fleet(args.fleet, True)))
    seq, conc = statistics.median(seqs), statistics.median(concs)
    print(
        f"\n{args.fleet} AsyncMachines launched+shut down (median of 3): sequential {seq:.2f} s, "
        f"concurrent {conc:.2f} s, speed-up {seq / conc:.2f}× on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
