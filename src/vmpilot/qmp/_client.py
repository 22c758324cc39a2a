"""What both QMP drivers share that involves no I/O: configuration, the
event queue and listeners, closed-state reporting, timeout defaults, how a
failed send is reported, and the steps of connecting (a plan, see
`vmpilot._util.plan`, run by each driver with its own primitives)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from types import EllipsisType
from typing import Any, Final

from .._util.deadline import Deadline
from .._util.plan import Call, Plan
from ..errors import Disconnected, Timeout
from . import _transport
from .events import EventLog, Listener, NameFilter
from .protocol import DEFAULT_MAX_LINE, ErrorReply, Event, Greeting, QMPProtocol, Reply
from .schema import Schema

traffic = logging.getLogger("vmpilot.qmp")  # every message at DEBUG, with the connection's name

DEFAULT_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0


class _ClientTimeout:
    """The default of every call's `timeout`: the client's own `timeout`
    (set at connect, `DEFAULT_TIMEOUT` unless changed)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "CLIENT_TIMEOUT"


CLIENT_TIMEOUT: Final = _ClientTimeout()

# `...` is still accepted (it was the default before `CLIENT_TIMEOUT`), and so is
# a caller's `Deadline`, used as is so nested calls share one deadline.
TimeoutArg = float | None | _ClientTimeout | EllipsisType | Deadline


def send_failed(exc: OSError, name: str, quit_sent: bool, peer: str) -> tuple[str, Disconnected]:
    """(reason to close with, error to raise) for a send of `name` that failed."""
    if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
        reason = "QEMU quit" if quit_sent else "the peer closed it"
        err = Disconnected(f"QMP connection to {peer} closed ({reason}) while sending {name!r}")
    else:
        reason = f"sending {name!r} failed: {exc}"
        err = Disconnected(f"cannot send {name!r} to {peer}: {exc}")
    err.__cause__ = exc
    return reason, err


def message_command(message: Mapping[str, Any]) -> tuple[str, Any, bool]:
    """(name, arguments, oob) of a raw QMP command message."""
    oob = "exec-oob" in message
    name = message.get("exec-oob" if oob else "execute")
    if not isinstance(name, str):
        raise TypeError(f'a QMP message needs "execute": "<name>", not {message!r}')
    return name, message.get("arguments"), oob


def reply_message(reply: Reply | ErrorReply) -> dict[str, Any]:
    """A reply as QEMU's raw message: `{"return": ...}` or `{"error": {...}}`."""
    if isinstance(reply, Reply):
        return {"return": reply.value}
    return {"error": {"class": reply.error_class, "desc": reply.desc}}


def connect_plan(address: _transport.Address, deadline: Deadline, name: str) -> Plan[socket.socket]:
    """Try every address `address` resolves to, in order, until one connects.

    Primitives: `resolve(host, port, family)` -> [(family, sockaddr)] and
    `connect(family, sockaddr, deadline)` -> connected socket (closing it
    on failure); both raise `OSError`, `connect` raises `Timeout` too."""
    errors: list[str] = []
    for family, sockaddr in _transport.targets(address):
        infos: list[tuple[int, Any]]
        if family == socket.AF_UNIX:
            infos = [(family, sockaddr)]
        else:
            assert isinstance(sockaddr, tuple)
            host, port = sockaddr
            try:
                infos = yield Call("resolve", host, port, family)
            except OSError as exc:
                errors.append(f"{host}: {exc}")
                continue
        for fam, sa in infos:
            try:
                sock: socket.socket = yield Call("connect", fam, sa, deadline)
                return sock
            except Timeout:
                raise Timeout(f"connecting to {name}", deadline.timeout) from None
            except OSError as exc:
                errors.append(f"{sa}: {exc.strerror or exc}")
    raise Disconnected(f"cannot connect to QMP at {name}: " + "; ".join(errors))


class ClientBase:
    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float | None,
        history: int,
        max_line: int = DEFAULT_MAX_LINE,
        name: str,
    ) -> None:
        Deadline(timeout)  # validates
        self.timeout = timeout
        self.name = name or _transport.describe(sock)
        self._sock: socket.socket | None = sock
        self._core = QMPProtocol(max_line=max_line)
        self._events = EventLog(history)
        self._closed_reason: str | None = None
        self.schema: Schema | None = None
        self.validate = False  # check commands against `schema` before sending

    @property
    def greeting(self) -> Greeting | None:
        return self._core.greeting

    # -- events -----------------------------------------------------------

    def get_events(self) -> list[Event]:
        """The events received and not consumed yet (consumes them)."""
        return self._events.drain()

    def clear_events(self) -> None:
        self._events.drain()

    @property
    def dropped_events(self) -> int:
        """How many events fell out of the bounded queue unconsumed."""
        return self._events.dropped

    def add_listener(
        self, callback: Listener, name: NameFilter = None, match: Mapping[str, Any] | None = None
    ) -> object:
        """Call `callback(event)` for each matching event as it arrives."""
        return self._events.add_listener(callback, name, match)

    def remove_listener(self, handle: object) -> None:
        self._events.remove_listener(handle)

    # -- state --------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._sock is None

    @property
    def closed_reason(self) -> str | None:
        return self._closed_reason

    def _check_open(self) -> None:
        if self._sock is None:
            raise Disconnected(f"QMP connection to {self.name} is closed ({self._closed_reason})")

    @property
    def dropped_replies(self) -> int:
        """Replies that came for commands abandoned (cancelled) and were dropped."""
        return self._core.late_replies

    def _deadline(self, timeout: TimeoutArg) -> Deadline:
        if timeout is CLIENT_TIMEOUT or timeout is ...:  # the common case first
            return Deadline(self.timeout)
        if isinstance(timeout, Deadline):
            return timeout
        return Deadline(timeout)  # type: ignore[arg-type]

    def _log_sent(self, data: bytes) -> None:
        """Log an outgoing message (callers check `traffic.isEnabledFor` first)."""
        traffic.debug("%s -> %s", self.name, data.strip().decode(errors="replace"))

    def _log_received(self, items: list[Any]) -> None:
        """Log incoming items (callers check `traffic.isEnabledFor` first)."""
        for item in items:
            traffic.debug("%s <- %r", self.name, item)

    def _check_command(self, name: str, arguments: Mapping[str, Any] | None) -> None:
        if self.validate and self.schema is not None:
            self.schema.validate(name, arguments)

    def __repr__(self) -> str:
        state = f"closed: {self._closed_reason}" if self._sock is None else "open"
        return f"<{type(self).__name__} {self.name} {state}>"
