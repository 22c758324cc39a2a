"""Bundled guest: launch→shell prompt and power-down→exit, vmpilot vs. raw
QEMU driven by hand, interleaved. TCG always; KVM too where it is real KVM.

    python bench/boot.py [-n 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import time

from vmpilot import Machine, guest
from vmpilot.machine.config import detect_accel

QEMU = os.environ.get("VMPILOT_QEMU") or shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"


def raw(image: guest.GuestImage, accel: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    qmp, qmp_q = socket.socketpair()
    ser, ser_q = socket.socketpair()
    argv = [
        QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-machine", "q35",
        "-accel", accel, *(["-cpu", "host"] if accel == "kvm" else []), "-m", "256M",
        "-kernel", image.kernel, "-initrd", image.initrd, "-append", image.append, "-no-reboot",
        "-chardev", f"socket,id=q,fd={qmp_q.fileno()}", "-mon", "chardev=q,mode=control",
        "-chardev", f"socket,id=s,fd={ser_q.fileno()}", "-serial", "chardev:s",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, pass_fds=[qmp_q.fileno(), ser_q.fileno()],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    qmp_q.close()
    ser_q.close()
    buf = b""
    ser.settimeout(180)
    while b"guest# " not in buf:
        chunk = ser.recv(65536)
        if not chunk:
            raise SystemExit("raw: console closed before the prompt")
        buf = buf[-64:] + chunk
    t1 = time.perf_counter()
    f = qmp.makefile("rb")
    f.readline()
    qmp.sendall(b'{"execute":"qmp_capabilities"}\n')
    f.readline()
    t2 = time.perf_counter()
    qmp.sendall(b'{"execute":"system_powerdown"}\n')
    while True:  # keep draining the console so the guest never blocks on it
        chunk = ser.recv(65536)
        if not chunk:
            break
    proc.wait(60)
    t3 = time.perf_counter()
    f.close()
    qmp.close()
    ser.close()
    return t1 - t0, t3 - t2


def vmpilot(image: guest.GuestImage, accel: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    vm = Machine(image.config(qemu=QEMU, accel=accel)).launch()
    vm.console.expect(guest.PROMPT, 180)
    t1 = time.perf_counter()
    vm.shutdown(method="powerdown", timeout=60)
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5)
    args = ap.parse_args()
    image = guest.default()
    accels = ["tcg"] + (["kvm"] if detect_accel()[0] == "kvm" else [])
    print(f"bundled guest {image.kernel_release}, q35, median of {args.n} interleaved boots")
    if "kvm" not in accels:
        print(f"(KVM skipped: {detect_accel()[1]})")
    print("| accel | how | launch→prompt | vs raw | powerdown→exit |")
    print("|---|---|---|---|---|")
    rows = []
    for accel in accels:
        res: dict[str, list[tuple[float, float]]] = {"raw QEMU by hand": [], "vmpilot Machine": []}
        for _ in range(args.n):
            res["raw QEMU by hand"].append(raw(image, accel))
            res["vmpilot Machine"].append(vmpilot(image, accel))
        base = statistics.median(s[0] for s in res["raw QEMU by hand"])
        for name, samples in res.items():
            boot = statistics.median(s[0] for s in samples)
            down = statistics.median(s[1] for s in samples)
            rows.append({"accel": accel, "how": name, "boot": boot, "down": down})
            print(
                f"| {accel} | {name} | {boot:.2f} s | {(boot / base - 1) * 100:+.1f} % "
                f"| {down * 1e3:.0f} ms |"
            )
    if os.environ.get("BENCH_JSON"):
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
