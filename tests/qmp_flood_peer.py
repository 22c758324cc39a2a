"""A QMP peer process that floods events: greeting, capabilities, then events
as fast as it can. Bounded: it stops after SECONDS, or when the client hangs up.

    python qmp_flood_peer.py FD SECONDS
"""

from __future__ import annotations

import socket
import sys
import time

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 9}}, "capabilities": []}}\r\n'
)
EVENT = b'{"event": "FLOOD", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}\r\n'


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.settimeout(10)  # reads and writes are bounded too
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)  # a deep backlog
    end = time.monotonic() + float(sys.argv[2])
    sock.sendall(GREETING)
    buf = b""
    while b"\n" not in buf:
        data = sock.recv(4096)
        if not data:
            return
        buf += data
    sock.sendall(b'{"return": {}, "id": 1}\r\n')  # the client's first id is 1
    burst = EVENT * 200
    try:
        while time.monotonic() < end:
            sock.sendall(burst)
    except (BrokenPipeError, ConnectionResetError):
        return  # the client hung up: done


if __name__ == "__main__":
    main()
