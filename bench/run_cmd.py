"""`vmpilot run -- true` end to end (a fresh process: Python, the guest cache
check, boot, CMD, power-off, exit) vs. the same boot by raw QEMU (the same
kernel, initramfs, command line and devices; QEMU started by hand, timed to
its exit). Interleaved, TCG.

    python bench/run_cmd.py [-n 5]
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import statistics
import subprocess
import sys
import time

from vmpilot import guest
from vmpilot.cli.run import _script
from vmpilot.machine.argv import build_argv

QEMU = os.environ.get("VMPILOT_QEMU") or shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"


def vmpilot_run() -> float:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "vmpilot", "run", "--accel", "tcg", "--qemu", QEMU, "--", "true"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=600,
    )  # fmt: skip
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"vmpilot run failed ({r.returncode}): {r.stderr.decode()}")
    return took


def raw_argv(image: guest.GuestImage) -> list[str]:
    """What vmpilot boots, with the console on a null UART and no QMP."""
    script = _script(["true"], "0123456789abcdef", None)
    options = "vmpilot.cmd=" + base64.b64encode(script.encode()).decode()
    return [*build_argv(image.config(options=options), "tcg", qemu=QEMU), "-serial", "null"]


def raw(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=600, check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=5)
    args = parser.parse_args()
    image = guest.default()
    argv = raw_argv(image)
    ours, theirs = [], []
    vmpilot_run()  # warm the page cache for both
    for _ in range(args.n):
        theirs.append(raw(argv))
        ours.append(vmpilot_run())
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"QEMU {QEMU}, TCG, n={args.n} (interleaved), medians:")
    print(f"  raw QEMU, same boot, to exit        {t:6.2f} s  (min {min(theirs):.2f})")
    print(f"  vmpilot run -- true, end to end     {o:6.2f} s  (min {min(ours):.2f})")
    print(f"  overhead                            {100 * (o - t) / t:+6.1f} %")


if __name__ == "__main__":
    main()
