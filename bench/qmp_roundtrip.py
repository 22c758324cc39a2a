"""QMP round trips: vmpilot's clients side by side with a raw socket and qemu.qmp.

One QEMU (-machine none) serves every contender over the same unix socket
(one client at a time), so the ratios compare clients, not QEMU runs.

    python bench/qmp_roundtrip.py [-n 2000] [-r 5]

Needs `pip install -e '.[bench]'` for the qemu.qmp rows (skipped without it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable

from vmpilot.qmp import AsyncQMPClient, QMPClient

Sample = tuple[float, float]  # (wall seconds, this process's CPU seconds)


def clock() -> Sample:
    return time.perf_counter(), time.process_time()


def since(t: Sample) -> Sample:
    return time.perf_counter() - t[0], time.process_time() - t[1]


def raw_socket(path: str, n: int, cmd: bytes = b'{"execute":"query-status"}\n') -> Sample:
    """The floor: the fastest plain client. A blocking socket (a kernel-side
    receive timeout, SO_RCVTIMEO, so a stuck QEMU ends the run without Python
    switching the socket to non-blocking mode), buffered readline, one
    constant pre-encoded command, and json.loads of each reply (every
    contender decodes what it receives)."""
    s = socket.socket(socket.AF_UNIX)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 30, 0))
    s.connect(path)
    f = s.makefile("rb")
    readline, send, loads = f.readline, s.send, json.loads
    loads(readline())  # greeting
    s.sendall(b'{"execute":"qmp_capabilities"}\n')
    loads(readline())
    t = clock()
    for _ in range(n):
        send(cmd)
        line = readline()
        if not line:
            raise SystemExit("QEMU closed the QMP socket")
        loads(line)  # -machine none sends no events: each line is the reply
    dt = since(t)
    f.close()
    s.close()
    return dt


def raw_socket_with_id(path: str, n: int) -> Sample:
    """The floor with a constant `"id"` in the command: QEMU itself takes
    longer to answer a command that carries an id (measured ~35 µs more here),
    and every client that matches replies by id pays that inside QEMU."""
    return raw_socket(path, n, b'{"execute":"query-status","id":1}\n')


def vmpilot_sync(path: str, n: int) -> Sample:
    with QMPClient.connect(path) as qmp:
        t = clock()
        for _ in range(n):
            qmp.execute("query-status")
        return since(t)


def vmpilot_async(path: str, n: int) -> Sample:
    async def main() -> Sample:
        async with AsyncQMPClient.connect(path) as qmp:
            t = clock()
            for _ in range(n):
                await qmp.execute("query-status")
            return since(t)

    return asyncio.run(main())


def vmpilot_async_pipelined(path: str, n: int, depth: int = 16) -> Sample:
    async def main() -> Sample:
        async with AsyncQMPClient.connect(path) as qmp:
            t = clock()
            for _ in range(n // depth):
                await asyncio.gather(*(qmp.execute("query-status") for _ in range(depth)))
            return since(t)

    return asyncio.run(main())


def qemu_qmp_async(path: str, n: int) -> Sample:
    from qemu.qmp import QMPClient as Q

    async def main() -> Sample:
        qmp = Q()
        await qmp.connect(path)
        t = clock()
        for _ in range(n):
            await qmp.execute("query-status")
        dt = since(t)
        await qmp.disconnect()
        return dt

    return asyncio.run(main())


def qemu_qmp_legacy(path: str, n: int) -> Sample:
    from qemu.qmp.legacy import QEMUMonitorProtocol

    qmp = QEMUMonitorProtocol(path)
    qmp.connect(negotiate=True)
    t = clock()
    for _ in range(n):
        qmp.cmd_obj({"execute": "query-status"})
    dt = since(t)
    qmp.close()
    return dt


CONTENDERS: list[tuple[str, Callable[[str, int], Sample]]] = [
    ("raw socket + json (floor)", raw_socket),
    ("raw socket + json, command with an id", raw_socket_with_id),
    ("vmpilot QMPClient", vmpilot_sync),
    ("vmpilot AsyncQMPClient", vmpilot_async),
    ("vmpilot AsyncQMPClient, 16 in flight", vmpilot_async_pipelined),
    ("qemu.qmp QMPClient (asyncio)", qemu_qmp_async),
    ("qemu.qmp legacy QEMUMonitorProtocol", qemu_qmp_legacy),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000, help="round trips per repeat")
    ap.add_argument("-r", "--repeats", type=int, default=5)
    args = ap.parse_args()
    qemu = os.environ.get("VMPILOT_QEMU") or shutil.which("qemu-system-x86_64")
    tmp = tempfile.mkdtemp(prefix="bench-qmp-")
    path = os.path.join(tmp, "qmp.sock")
    # -qmp (the unix server all contenders use) comes before a socketpair
    # monitor: once that one greets us, the listening socket exists. No polling.
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [
            str(qemu),
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            f"unix:{path},server=on,wait=off",
            "-chardev",
            f"socket,id=ready,fd={theirs.fileno()}",
            "-mon",
            "chardev=ready,mode=control",
        ],
        pass_fds=[theirs.fileno()],
        stderr=subprocess.DEVNULL,
    )
    theirs.close()
    try:
        ours.settimeout(30)
        if not ours.recv(4096).startswith(b'{"QMP"'):
            raise SystemExit("QEMU did not start")
        times: dict[str, list[Sample]] = {name: [] for name, _ in CONTENDERS}
        skipped: dict[str, str] = {}
        for _ in range(args.repeats):  # interleaved, so drift hits everyone alike
            for name, fn in CONTENDERS:
                if name in skipped:
                    continue
                try:
                    times[name].append(fn(path, args.n))
                except ImportError as exc:
                    skipped[name] = f"skipped ({exc.name} not installed)"

        def med(name: str, i: int) -> float:
            return statistics.median(s[i] for s in times[name])

        floor = CONTENDERS[0][0]
        print(f"QMP query-status round trips: n={args.n}, median of {args.repeats} repeats")
        print("| client | ops/s | wall per op | wall ratio | client CPU per op | CPU ratio |")
        print("|---|---|---|---|---|---|")
        for name, _ in CONTENDERS:
            if name in skipped:
                print(f"| {name} | {skipped[name]} | | | | |")
                continue
            wall, cpu = med(name, 0), med(name, 1)
            print(
                f"| {name} | {args.n / wall:,.0f} | {wall / args.n * 1e6:.1f} µs "
                f"| {wall / med(floor, 0):.2f}× | {cpu / args.n * 1e6:.1f} µs "
                f"| {cpu / med(floor, 1):.2f}× |"
            )
    finally:
        ours.close()
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
