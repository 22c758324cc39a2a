"""`QEMUMonitorProtocol` with the API of QEMU's `qemu.qmp.legacy`, on
vmpilot's blocking QMP client.

Both eras of `cmd` are served: before QEMU 8.2 it was `cmd(name, args=None,
cmd_id=None)` returning the whole response message; since then it is
`cmd(name, **kwargs)` returning the `return` value and raising on errors (the
old message-returning form is `cmd_raw`). A call with a positional dict,
`args=` or `cmd_id=` is the old form; a call with keyword arguments is the new
one; a bare `cmd("name")` follows `QEMUMonitorProtocol.era` ("new" by
default; set it, or VMPILOT_COMPAT_QMP_ERA=old, for a pre-8.2 suite).

Timeouts are honoured as given, int or float (the original treated an int
`wait` as "forever").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Mapping
from typing import Any, Union

from ..errors import CommandError, Disconnected, QMPError, Timeout
from ..qmp import QMPClient
from ..qmp.protocol import Event

QMPMessage = dict[str, Any]
QMPReturnValue = Any
SocketAddrT = Union[str, tuple[str, int]]  # noqa: UP007 (a runtime alias)

if issubclass(Timeout, asyncio.TimeoutError):
    QMPTimeoutError: type[Timeout] = Timeout
else:  # Python 3.10: asyncio.TimeoutError is its own class; be both

    class QMPTimeoutError(Timeout, asyncio.TimeoutError):  # type: ignore[no-redef]
        pass


class QMPBadPortError(QMPError):
    """A `host:port` address with a bad port."""


class ErrorInfo:
    """The `error` member of a QMP error reply (`qemu.qmp.models.ErrorInfo`)."""

    def __init__(self, class_: str, desc: str) -> None:
        self.class_ = class_
        self.desc = desc


class ErrorResponse:
    """A QMP error reply, parsed (`qemu.qmp.models.ErrorResponse`)."""

    def __init__(self, error: ErrorInfo, id: object = None) -> None:
        self.error = error
        self.id = id


class ExecuteError(CommandError):
    """The new-era `cmd()` error (`qemu.qmp.qmp_client.ExecuteError`: `error_class`,
    `error`, `sent`, `received`); also a vmpilot `CommandError`."""

    def __init__(self, error: CommandError) -> None:
        super().__init__(error.command, error.arguments, error.error_class, error.desc)
        self.error_response = {"error": {"class": error.error_class, "desc": error.desc}}
        self.error = ErrorResponse(ErrorInfo(error.error_class, error.desc))
        self.sent: QMPMessage = {"execute": error.command}
        if error.arguments:
            self.sent["arguments"] = error.arguments
        self.received: QMPMessage = self.error_response


def event_dict(event: Event) -> QMPMessage:
    """An event as the QMP message QEMU sent."""
    seconds = int(event.timestamp)
    micro = round((event.timestamp - seconds) * 1e6)
    if micro >= 1_000_000:
        seconds, micro = seconds + 1, micro - 1_000_000
    msg: QMPMessage = {
        "event": event.name,
        "timestamp": {"seconds": seconds, "microseconds": micro},
    }
    if event.data:
        msg["data"] = event.data
    return msg


def _wait_seconds(wait: bool | float) -> float | None:
    """The legacy `wait` argument: False/0 → don't wait, True → no limit, a
    number (int or float) → that many seconds."""
    if wait is True:
        return None
    return float(wait)


class QEMUMonitorProtocol:
    """A blocking QMP connection with the legacy API."""

    era = os.environ.get("VMPILOT_COMPAT_QMP_ERA", "new")

    def __init__(
        self,
        address: SocketAddrT | socket.socket,
        server: bool = False,
        nickname: str | None = None,
    ) -> None:
        if server and isinstance(address, socket.socket):
            raise ValueError("server argument should be False when passing a socket")
        self._address = address
        self._nickname = nickname
        self._timeout: float | None = None
        self.connect_timeout: float | None = 15.0
        self._client: QMPClient | None = None
        self._greeting: QMPMessage | None = None
        self._listener: socket.socket | None = None
        if server:
            self._listener = self._listen(address)

    @staticmethod
    def _listen(address: SocketAddrT | socket.socket) -> socket.socket:
        if isinstance(address, tuple):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(address)  # type: ignore[arg-type]
            sock.listen(1)
        except BaseException:
            sock.close()
            raise
        return sock

    @classmethod
    def parse_address(cls, address: str) -> SocketAddrT:
        parts = address.split(":")
        if len(parts) == 2:
            try:
                return (parts[0], int(parts[1]))
            except ValueError:
                raise QMPBadPortError(f"Bad port: '{parts[1]}' in '{address}'.") from None
        return address

    # -- connecting -------------------------------------------------------

    def _open(self, sock_or_addr: Any, negotiate: bool, timeout: float | None) -> None:
        self._client = QMPClient.connect(
            sock_or_addr, negotiate=negotiate, connect_timeout=timeout, timeout=self._timeout
        )
        greeting = self._client.greeting
        self._greeting = greeting.raw if greeting is not None else None

    def connect(self, negotiate: bool = True) -> QMPMessage | None:
        """Connect (and negotiate); the greeting, or None without negotiation."""
        self._open(self._address, negotiate, self.connect_timeout)
        return self._greeting if negotiate else None

    def accept(self, timeout: float | None = 15.0) -> QMPMessage:
        """Wait for QEMU to connect to our listening socket, then negotiate."""
        if self._listener is None:
            raise QMPError("accept() needs QEMUMonitorProtocol(..., server=True)")
        self._listener.settimeout(timeout)
        try:
            conn, _ = self._listener.accept()
        except TimeoutError:
            raise QMPTimeoutError("QEMU to connect to the QMP socket", timeout) from None
        finally:
            self._listener.close()
            self._listener = None
        self._open(conn, True, timeout)
        assert self._greeting is not None
        return self._greeting

    def _qmp(self) -> QMPClient:
        if self._client is None:
            raise Disconnected("QMP is not connected (connect() or accept() first)")
        return self._client

    # -- commands ---------------------------------------------------------

    def cmd_obj(self, qmp_cmd: QMPMessage) -> QMPMessage:
        """Send a command message; return the response message (errors included)."""
        response = self._qmp().execute_message(qmp_cmd, timeout=self._timeout)
        if "id" in qmp_cmd:
            response["id"] = qmp_cmd["id"]
        return response

    def cmd_raw(self, name: str, args: Mapping[str, object] | None = None) -> QMPMessage:
        msg: QMPMessage = {"execute": name}
        if args:
            msg["arguments"] = dict(args)
        return self.cmd_obj(msg)

    def cmd(self, cmd: str, *args: Any, **kwds: Any) -> Any:
        """Both eras: see the module docstring."""
        old = bool(args) or "args" in kwds or "cmd_id" in kwds or (not kwds and self.era == "old")
        if old:
            arguments = args[0] if args else kwds.get("args")
            msg: QMPMessage = {"execute": cmd}
            if arguments:
                msg["arguments"] = dict(arguments)
            if kwds.get("cmd_id") is not None:
                msg["id"] = kwds["cmd_id"]
            return self.cmd_obj(msg)
        return self.command(cmd, **kwds)

    def command(self, cmd: str, **kwds: Any) -> QMPReturnValue:
        """Run `cmd`; its return value, or `ExecuteError`."""
        try:
            return self._qmp().execute(cmd, kwds or None, timeout=self._timeout)
        except CommandError as exc:
            raise ExecuteError(exc) from None

    # -- events -----------------------------------------------------------

    def pull_event(self, wait: bool | float = False) -> QMPMessage | None:
        """One event: `wait` False/0 → None if none is there; True → wait
        without limit; a number → wait that long, then raise a timeout."""
        client = self._qmp()
        if not wait:
            with contextlib.suppress(Disconnected):
                client.poll_events()
            try:  # the oldest event already here, if any (a zero timeout waits for nothing)
                return event_dict(client.wait_event(timeout=0))
            except (Timeout, Disconnected):
                return None
        timeout = _wait_seconds(wait)
        try:
            return event_dict(client.wait_event(timeout=timeout))
        except Timeout:
            raise QMPTimeoutError("a QMP event", timeout) from None

    def get_events(self, wait: bool | float = False) -> list[QMPMessage]:
        """All events received so far; with `wait`, wait for at least one."""
        client = self._qmp()
        with contextlib.suppress(Disconnected):
            client.poll_events()
        events = [event_dict(e) for e in client.get_events()]
        if not events and wait:
            first = self.pull_event(wait)
            events = [first] if first is not None else []
        return events

    def clear_events(self) -> None:
        if self._client is not None:
            self._client.clear_events()

    # -- misc -------------------------------------------------------------

    def settimeout(self, timeout: float | None) -> None:
        """The timeout of `cmd`, `cmd_obj`, `cmd_raw` and `command`."""
        self._timeout = timeout
        if self._client is not None:
            self._client.timeout = timeout

    def send_fd_scm(self, fd: int) -> None:
        """Send `fd` via SCM_RIGHTS; the next `getfd`/`add-fd` takes it."""
        self._qmp().pass_fd(fd)

    def get_sock_fd(self) -> int:
        sock = self._qmp()._sock
        return sock.fileno() if sock is not None else -1

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def __enter__(self) -> QEMUMonitorProtocol:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
