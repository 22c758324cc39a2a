"""Event filtering, the bounded queue of unconsumed events, and listeners.

Shared by both drivers: the sync client fills the queue while it reads, the
asyncio client from its reader callback; the rules of matching live here once.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Collection, Mapping
from typing import Any

from .protocol import Event

log = logging.getLogger("vmpilot.qmp")

NameFilter = str | Collection[str] | None
DEFAULT_HISTORY = 1000


def match_data(data: Any, pattern: Any) -> bool:
    """Recursive partial match: every key of a dict `pattern` must be in `data`
    with a matching value; any other value must be equal."""
    if isinstance(pattern, Mapping):
        if not isinstance(data, Mapping):
            return False
        for key, want in pattern.items():
            if key not in data or not match_data(data[key], want):
                return False
        return True
    return bool(data == pattern)


def event_matches(event: Event, name: NameFilter, match: Mapping[str, Any] | None) -> bool:
    if name is not None:
        if isinstance(name, str):
            if event.name != name:
                return False
        elif event.name not in name:
            return False
    return match is None or match_data(event.data, match)


def describe(name: NameFilter, match: Mapping[str, Any] | None) -> str:
    """Human description of an event filter, for timeout messages."""
    what = (
        "any event"
        if name is None
        else (f"event {name!r}" if isinstance(name, str) else f"one of events {sorted(name)}")
    )
    return what + (f" with data matching {dict(match)!r}" if match else "")


Listener = Callable[[Event], object]


class _Registration:
    __slots__ = ("callback", "match", "name")

    def __init__(self, callback: Listener, name: NameFilter, match: Mapping[str, Any] | None):
        self.callback = callback
        self.name = name
        self.match = match


class EventLog:
    """Unconsumed events, oldest first, bounded (drop-oldest), plus listeners.

    `dropped` counts events pushed out of a full queue, so a test that forgot
    to drain events can tell it missed some.
    """

    def __init__(self, maxlen: int = DEFAULT_HISTORY) -> None:
        if maxlen < 1:
            raise ValueError(f"event history must hold at least one event, not {maxlen}")
        self.queue: deque[Event] = deque(maxlen=maxlen)
        self.dropped = 0
        self._listeners: list[_Registration] = []

    def add_listener(
        self,
        callback: Listener,
        name: NameFilter = None,
        match: Mapping[str, Any] | None = None,
    ) -> object:
        """Call `callback(event)` for every matching event; returns a handle."""
        reg = _Registration(callback, name, match)
        self._listeners.append(reg)
        return reg

    def remove_listener(self, handle: object) -> None:
        try:
            self._listeners.remove(handle)  # type: ignore[arg-type]
        except ValueError:
            raise ValueError("no such listener (already removed?)") from None

    def notify(self, event: Event) -> None:
        """Give `event` to the listeners (a failing listener is logged, not fatal)."""
        for reg in self._listeners:
            if event_matches(event, reg.name, reg.match):
                try:
                    reg.callback(event)
                except Exception:
                    log.exception("QMP event listener %r failed on %r", reg.callback, event)

    def push(self, event: Event) -> None:
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1
        self.queue.append(event)

    def take(self, name: NameFilter, match: Mapping[str, Any] | None) -> Event | None:
        """Remove and return the oldest queued event that matches, if any."""
        for i, event in enumerate(self.queue):
            if event_matches(event, name, match):
                del self.queue[i]
                return event
        return None

    def drain(self) -> list[Event]:
        events = list(self.queue)
        self.queue.clear()
        return events
