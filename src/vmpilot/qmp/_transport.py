"""Addresses and sockets shared by both QMP drivers: parsing what the user
gave us, and sending a message together with file descriptors."""

from __future__ import annotations

import array
import os
import re
import socket
from collections.abc import Sequence
from typing import Union

from .._util.fds import check_fd as check_fd  # its home is _util; kept importable here
from ..errors import Disconnected, QMPError

Address = Union[str, "os.PathLike[str]", tuple[str, int], socket.socket, int]

_HOSTPORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:/\[\]]*)):(?P<port>\d{1,5})$")


def describe(address: Address) -> str:
    if isinstance(address, socket.socket):
        return f"socket fd {address.fileno()}"
    if isinstance(address, int):
        return f"fd {address}"
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return os.fspath(address)


def adopt(address: socket.socket | int) -> socket.socket:
    """Take an already-connected socket object or fd (the client will own it)."""
    if isinstance(address, int):
        if isinstance(address, bool) or address < 0:
            raise TypeError(f"not a file descriptor: {address!r}")
        try:
            return socket.socket(fileno=address)
        except OSError as exc:
            raise Disconnected(f"fd {address} is not a usable socket: {exc}") from exc
    if address.fileno() < 0:
        raise Disconnected("the socket given is already closed")
    return address


def targets(address: Address) -> list[tuple[int, str | tuple[str, int]]]:
    """Resolve a path, `host:port` or `(host, port)` into (family, sockaddr) pairs.

    A string is a unix socket path unless it looks like `host:port` and no
    such file exists; TCP names are resolved by the caller.
    """
    if isinstance(address, tuple):
        host, port = address
        return [(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, int(port)))]
    if not isinstance(address, (str, os.PathLike)):
        raise TypeError(
            f"QMP address must be a path, 'host:port', (host, port), a socket or an fd, "
            f"not {type(address).__name__}"
        )
    text = os.fspath(address)
    m = _HOSTPORT.match(text)
    if m and not os.path.exists(text):
        port = int(m["port"])
        if not 0 < port < 65536:
            raise QMPError(f"port out of range in QMP address {text!r}")
        if m["v6"]:
            return [(socket.AF_INET6, (m["v6"], port))]
        return [(0, (m["host"] or "127.0.0.1", port))]
    if not text:
        raise QMPError("empty QMP address")
    return [(socket.AF_UNIX, text)]


def sendmsg_fds(
    sock: socket.socket, data: bytes | memoryview, fds: Sequence[int], flags: int = 0
) -> int:
    """Send `data` with `fds` attached (SCM_RIGHTS); returns bytes sent."""
    if sock.family != socket.AF_UNIX:
        raise QMPError("file descriptors can only be passed over a unix socket")
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    return sock.sendmsg([data], anc, flags)
