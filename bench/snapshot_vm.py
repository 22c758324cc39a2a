"""Per-test setup of the bundled guest: the `vm` fixture's way (launch, boot
to the shell prompt) vs `snapshot_vm`'s (revert to the prompt snapshot, the
shell answers), side by side, interleaved. TCG.

    python bench/snapshot_vm.py [-n 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

from vmpilot import Machine, guest
from vmpilot.snapshot_fixture import FreshVM

QEMU = os.environ.get("VMPILOT_QEMU") or shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"


def boot(image: guest.GuestImage) -> float:
    """What the `vm` fixture does before a test."""
    t0 = time.perf_counter()
    vm = Machine(image.config(qemu=QEMU, accel="tcg")).launch()
    vm.shell.wait_ready(timeout=180)
    took = time.perf_counter() - t0
    vm.shutdown(method="powerdown", timeout=60)
    return took


def revert(fresh: FreshVM) -> float:
    """What the `snapshot_vm` fixture does before a test (once booted)."""
    t0 = time.perf_counter()
    fresh.fresh()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=10)
    args = ap.parse_args()
    image = guest.default()
    fresh = FreshVM(image.config(qemu=QEMU, accel="tcg"))
    try:
        t0 = time.perf_counter()
        fresh.fresh()  # the once-per-worker boot and snapshot
        first = time.perf_counter() - t0
        boots, reverts = [], []
        for _ in range(args.n):
            boots.append(boot(image))
            reverts.append(revert(fresh))
        assert fresh.boots == 1, "a revert fell back to booting"
    finally:
        fresh.close()
    b, r = statistics.median(boots), statistics.median(reverts)
    print(f"bundled guest {image.kernel_release}, q35, TCG, median of {args.n}, interleaved")
    print("| fixture | per-test setup | vs boot |")
    print("|---|---|---|")
    print(f"| `vm` (launch, boot to the prompt) | {b:.2f} s | 100 % |")
    print(f"| `snapshot_vm` (revert, shell answers) | {r * 1e3:.0f} ms | {r / b * 100:.1f} % |")
    print(f"(`snapshot_vm` once per worker: boot + snapshot-save {first:.2f} s; "
          f"range: boot {min(boots):.2f}–{max(boots):.2f} s, "
          f"revert {min(reverts) * 1e3:.0f}–{max(reverts) * 1e3:.0f} ms)")  # fmt: skip
    if os.environ.get("BENCH_JSON"):
        print(json.dumps({"boot": boots, "revert": reverts, "first": first}))


if __name__ == "__main__":
    main()
