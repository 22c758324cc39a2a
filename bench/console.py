"""Console throughput: push 1 MB and 10 MB through a console and expect a
marker at the end; MB/s and the 10 MB / 1 MB time ratio (linear = ~10).

    python bench/console.py [-r 5]

The stream is fed by this process into one end of a socketpair (the console
reads the other end exactly as it reads QEMU's chardev), so the figure is the
console's own cost. The floor is a raw recv loop with bytes.find.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time

from vmpilot.console import Console

LINE = b"[ 12.345678] some kernel-ish log line with a bit of text in it, 0123456789\r\n"


def payload(mb: int) -> bytes:
    n = mb * 1_000_000 // len(LINE)
    return LINE * n + b"END-OF-STREAM\r\n"


def feed(sock: socket.socket, data: bytes) -> threading.Thread:
    t = threading.Thread(target=sock.sendall, args=(data,))
    t.start()
    return t


def raw(data: bytes) -> float:
    a, b = socket.socketpair()
    t0 = time.perf_counter()
    t = feed(b, data)
    buf = bytearray()
    while buf.find(b"END-OF-STREAM", max(0, len(buf) - 70000)) < 0:
        buf += a.recv(65536)
    dt = time.perf_counter() - t0
    t.join()
    a.close()
    b.close()
    return dt


def console(data: bytes) -> float:
    """As a Machine uses it: with the transcript file written as data arrives."""
    a, b = socket.socketpair()
    tmp = tempfile.mkdtemp(prefix="bench-console-")
    con = Console(a, os.path.join(tmp, "console.log"), "bench")
    t0 = time.perf_counter()
    t = feed(b, data)
    con.expect("END-OF-STREAM", timeout=120)
    dt = time.perf_counter() - t0
    t.join()
    con.close()
    b.close()
    shutil.rmtree(tmp)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-r", "--repeats", type=int, default=5)
    args = ap.parse_args()
    sizes = {1: payload(1), 10: payload(10)}
    res: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for mb, data in sizes.items():
            for name, fn in (
                ("raw recv + find (floor)", raw),
                ("vmpilot Console.expect (+ transcript)", console),
            ):
                res.setdefault((name, mb), []).append(fn(data))
    print(f"console stream then expect() of a marker at its end; median of {args.repeats}")
    print("| reader | 1 MB | 10 MB | MB/s (10 MB) | 10 MB / 1 MB time |")
    print("|---|---|---|---|---|")
    for name in ("raw recv + find (floor)", "vmpilot Console.expect (+ transcript)"):
        t1 = statistics.median(res[(name, 1)])
        t10 = statistics.median(res[(name, 10)])
        print(
            f"| {name} | {t1 * 1e3:.1f} ms | {t10 * 1e3:.1f} ms | {10 / t10:.0f} | {t10 / t1:.1f}× |"
        )


if __name__ == "__main__":
    main()
