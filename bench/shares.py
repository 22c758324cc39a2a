"""Share throughput inside the bundled guest: write then read a 100 MB file
on a host directory shared with virtiofs (and, for scale, on the guest's
tmpfs), timed by busybox dd in the guest. Reads are of a file written on the
host, so the guest's page cache does not answer them. TCG unless told.

    python bench/shares.py [-n 3] [--size-mb 100] [--accel tcg]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import tempfile

from vmpilot import Machine, Share, guest
from vmpilot.machine import virtiofs

QEMU = os.environ.get("VMPILOT_QEMU") or shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
_TIMES = re.compile(r"T ([\d.]+) ([\d.]+)")


def dd(vm: Machine, args: str, size_mb: int) -> float:
    """MB/s of one dd run, timed in the guest (/proc/uptime around it; this
    busybox's dd prints no rate)."""
    out = vm.shell.check(
        f"a=$(cut -d' ' -f1 /proc/uptime); dd {args} 2>/dev/null; "
        f"echo T $a $(cut -d' ' -f1 /proc/uptime)",
        timeout=600,
    )
    m = _TIMES.search(out)
    if m is None:
        raise SystemExit(f"unexpected output: {out!r}")
    return size_mb * (1 << 20) / (float(m[2]) - float(m[1])) / 1e6


def run(image: guest.GuestImage, size_mb: int, accel: str, where: str) -> dict[str, float]:
    host = tempfile.mkdtemp(prefix="vmpilot-bench-share-")
    try:
        with open(os.path.join(host, "from-host"), "wb") as f:
            for _ in range(size_mb):
                f.write(os.urandom(1 << 20))
        cfg = image.config(qemu=QEMU, accel=accel, memory="512M", shares=[Share(host, "/share")])
        with Machine(cfg) as vm:
            vm.shell.wait_ready(timeout=180)
            target = "/share" if where == "virtiofs" else "/tmp"
            if where == "tmpfs":
                vm.shell.check("cp /share/from-host /tmp/from-host", timeout=600)
            vm.shell.check("sync; echo 3 > /proc/sys/vm/drop_caches")
            write = dd(
                vm, f"if=/dev/zero of={target}/from-guest bs=1M count={size_mb} conv=fsync", size_mb
            )
            vm.shell.check(f"rm {target}/from-guest; echo 3 > /proc/sys/vm/drop_caches")
            read = dd(vm, f"if={target}/from-host of=/dev/null bs=1M", size_mb)
            vm.shutdown(method="powerdown", timeout=60)
        return {"write_MBps": write, "read_MBps": read}
    finally:
        shutil.rmtree(host, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--size-mb", type=int, default=100)
    ap.add_argument("--accel", default="tcg")
    args = ap.parse_args()
    binary = virtiofs.find_virtiofsd()
    if binary is None:
        raise SystemExit("no virtiofsd installed: nothing to measure")
    image = guest.default()
    results: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.n):
        for where in ("virtiofs", "tmpfs"):
            r = run(image, args.size_mb, args.accel, where)
            for key, value in r.items():
                results.setdefault(where, {}).setdefault(key, []).append(value)
    summary = {
        where: {k: round(statistics.median(v), 1) for k, v in rs.items()}
        for where, rs in results.items()
    }
    print(json.dumps({"virtiofsd": binary, "accel": args.accel, "size_mb": args.size_mb,
                      "runs": args.n, "median": summary, "all": results}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
