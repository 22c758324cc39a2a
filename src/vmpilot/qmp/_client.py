"""What both QMP drivers share that involves no I/O: configuration, the
event queue and listeners, closed-state reporting, and timeout defaults."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from .._util.deadline import Deadline
from .._util.deadline import TimeoutArg as TimeoutArg  # its home is _util
from ..errors import Disconnected
from . import _transport
from .events import EventLog, Listener, NameFilter
from .protocol import DEFAULT_MAX_LINE, Event, Greeting, QMPProtocol
from .schema import Schema

DEFAULT_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0


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

    def _deadline(self, timeout: TimeoutArg) -> Deadline:
        return Deadline(self.timeout if timeout is ... else timeout)

    def _check_command(self, name: str, arguments: Mapping[str, Any] | None) -> None:
        if self.validate and self.schema is not None:
            self.schema.validate(name, arguments)

    def __repr__(self) -> str:
        state = f"closed: {self._closed_reason}" if self._sock is None else "open"
        return f"<{type(self).__name__} {self.name} {state}>"
