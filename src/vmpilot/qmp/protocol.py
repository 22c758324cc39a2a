"""QMP as a pure state machine: bytes in, parsed items out; commands in, bytes out.

No sockets, no clock, no threads, so that every rule of the protocol lives once
and can be fuzzed. Anything malformed, whatever its shape (integers wider than
QEMU's 64 bits included), raises `ProtocolError` and nothing else; the
connection is then broken for good (a peer that sent garbage cannot be trusted
to frame the next message correctly). End of stream is judged here too, as
h11 and wsproto do: `receive_data(b"")` gives a `ConnectionLost` (clean after
`quit`, whose reply QEMU's leaving stands for), so the drivers never re-decide
it. Items are frozen dataclasses: shared between threads and listeners, none
can alter what another sees.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from ..errors import CommandError, Disconnected, ProtocolError, QMPError

DEFAULT_MAX_LINE = 64 * 1024 * 1024

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_loads = json.JSONDecoder().decode
# the C scanner without decode()'s wrapping (typeshed does not list the attribute)
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


class State(enum.Enum):
    GREETING = "greeting"  # waiting for the server's greeting
    GREETED = "greeted"  # greeting seen, capabilities not negotiated yet
    NEGOTIATING = "negotiating"  # qmp_capabilities sent
    RUNNING = "running"
    CLOSED = "closed"


_INT64 = 1 << 63  # QEMU's integers are 64-bit: anything wider is not QEMU talking


def _is_int(value: object) -> TypeGuard[int]:
    return type(value) is int and -_INT64 <= value < _INT64


@dataclass(frozen=True, slots=True)
class Greeting:
    """The server's hello: its version and the capabilities it offers."""

    version: dict[str, Any]
    capabilities: tuple[str, ...]
    raw: dict[str, Any] = field(repr=False)
    qemu_version: tuple[int, int, int] = (0, 0, 0)
    """(major, minor, micro); (0, 0, 0) when the server did not say."""

    def __repr__(self) -> str:
        return f"Greeting(qemu={self.qemu_version}, capabilities={list(self.capabilities)})"


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful answer to command `id`."""

    id: int
    value: Any
    command: str


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """An error answer to command `id`; `error()` makes the matching exception."""

    id: int
    error_class: str
    desc: str
    command: str
    arguments: dict[str, Any] | None

    def error(self) -> CommandError:
        return CommandError(self.command, self.arguments, self.error_class, self.desc)


@dataclass(frozen=True, slots=True)
class Event:
    """An asynchronous event, with QEMU's own timestamp (`seconds`, `microseconds`
    since the epoch, as QEMU sent them); `timestamp` is the same as a float."""

    name: str
    data: dict[str, Any]
    seconds: int
    microseconds: int

    @property
    def timestamp(self) -> float:
        return self.seconds + self.microseconds / 1e6

    def __repr__(self) -> str:
        return f"Event({self.name!r}, {self.data!r}, timestamp={self.timestamp:.6f})"


@dataclass(frozen=True, slots=True)
class ConnectionLost:
    """End of stream, as the core judges it: `clean` when QEMU closed after
    `quit` was sent (the quit itself is then answered by a synthetic `Reply`
    just before this item); otherwise the peer went away unasked."""

    clean: bool
    reason: str


Item = Greeting | Reply | ErrorReply | Event | ConnectionLost


class _Pending:
    __slots__ = ("arguments", "name")

    def __init__(self, name: str, arguments: dict[str, Any] | None):
        self.name = name
        self.arguments = arguments


class QMPProtocol:
    """The QMP client side of one connection, with no I/O of its own.

    Feed every byte received to `receive_data`; send the bytes that
    `send_command` returns. Ids are allocated here and replies are matched to
    them, so a driver only routes `Reply`/`ErrorReply` by `id`.
    """

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 64:
            raise ValueError(f"max_line must be at least 64 bytes, not {max_line}")
        self.max_line = max_line
        self.state = State.GREETING
        self.greeting: Greeting | None = None
        self.oob_enabled = False
        self.quit_sent = False
        self.quit_id: int | None = None
        self.late_replies = 0  # replies to abandoned commands, dropped
        self._pending: dict[int, _Pending] = {}
        self._abandoned: set[int] = set()
        self._next_id = 1
        self._negotiate_id = -1
        self._partial = bytearray()
        self._error: ProtocolError | None = None
        self._heads: dict[tuple[str, bool], bytes] = {}

    # -- outgoing ---------------------------------------------------------

    def negotiate(self, enable: Sequence[str] = ()) -> tuple[int, bytes]:
        """Bytes for `qmp_capabilities`, enabling `enable` (must be offered)."""
        if self.state is not State.GREETED:
            raise QMPError(f"cannot negotiate capabilities in state {self.state.value!r}")
        assert self.greeting is not None
        missing = [c for c in enable if c not in self.greeting.capabilities]
        if missing:
            raise QMPError(
                f"server does not offer capabilities {missing}; it offers "
                f"{list(self.greeting.capabilities)}"
            )
        args = {"enable": list(enable)} if enable else None
        self.state = State.NEGOTIATING
        self.oob_enabled = "oob" in enable
        id_, data = self._encode("qmp_capabilities", args, oob=False)
        self._negotiate_id = id_
        return id_, data

    def send_command(
        self, name: str, arguments: Mapping[str, Any] | None = None, *, oob: bool = False
    ) -> tuple[int, bytes]:
        """Allocate an id for command `name` and return `(id, bytes to send)`."""
        if self.state is not State.RUNNING:
            if self.state is State.CLOSED:
                raise Disconnected(f"cannot send {name!r}: the connection is closed")
            raise QMPError(f"cannot send {name!r} before capabilities are negotiated")
        if self.quit_sent:
            raise Disconnected(f"cannot send {name!r}: 'quit' was sent, QEMU is exiting")
        if oob and not self.oob_enabled:
            raise QMPError(f"cannot send {name!r} out-of-band: OOB was not negotiated")
        return self._encode(name, arguments, oob=oob)

    def _encode(
        self, name: str, arguments: Mapping[str, Any] | None, *, oob: bool
    ) -> tuple[int, bytes]:
        if not isinstance(name, str) or not name:
            raise TypeError(f"command name must be a non-empty str, not {name!r}")
        if arguments is not None and not isinstance(arguments, Mapping):
            raise TypeError(f"arguments of {name!r} must be a mapping, not {type(arguments)}")
        id_ = self._next_id
        # `{"execute":<name>,"arguments":<args>,"id":<id>}` spliced from cached
        # parts: the same bytes json would make, for a fraction of the cost
        head = self._heads.get((name, oob))
        if head is None:
            head = (('{"exec-oob":' if oob else '{"execute":') + _dumps(name)).encode()
            if len(self._heads) < 256:
                self._heads[(name, oob)] = head
        args = None
        if arguments:
            args = dict(arguments)
            try:
                encoded = _dumps(args)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"arguments of {name!r} are not JSON-serialisable: {exc}") from None
            data = b'%s,"arguments":%s,"id":%d}\n' % (head, encoded.encode(), id_)
        else:
            data = b'%s,"id":%d}\n' % (head, id_)
        self._next_id = id_ + 1
        self._pending[id_] = _Pending(name, args)
        if name == "quit":
            self.quit_sent = True
            self.quit_id = id_
        return id_, data

    def unsend(self, id_: int) -> None:
        """Take back command `id_` whose bytes never left (its send timed out
        before the first byte): as if `send_command` had not been called."""
        if self._pending.pop(id_, None) is not None and id_ == self.quit_id:
            self.quit_sent = False
            self.quit_id = None

    def abandon(self, id_: int) -> None:
        """Forget command `id_`: its reply, if it ever comes, is dropped silently."""
        if self._pending.pop(id_, None) is not None:
            self._abandoned.add(id_)

    @property
    def pending(self) -> list[int]:
        """Ids of the commands sent and not answered yet."""
        return list(self._pending)

    def command_name(self, id_: int) -> str:
        p = self._pending.get(id_)
        return p.name if p else "?"

    def close(self) -> list[int]:
        """Mark the connection closed; returns the ids that will never be answered."""
        self.state = State.CLOSED
        ids = list(self._pending)
        self._pending.clear()
        return ids

    # -- incoming ---------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Item]:
        """Parse `data` (any split of the stream) into complete items.

        `b""` means end of stream: the result ends with a `ConnectionLost`
        (after a synthetic `Reply` to `quit` if quit was sent and unanswered:
        QEMU leaving is its answer) and the connection is closed.

        On a violation raises `ProtocolError`; its `items` attribute holds the
        items that were complete before the bad one, so a driver can still
        deliver them.
        """
        if self._error is not None:
            raise self._error
        if self.state is State.CLOSED:
            return []
        if not data:
            return self._end_of_stream()
        items: list[Item] = []
        start = 0
        try:
            if self._partial:
                nl = data.find(b"\n")
                if nl < 0:
                    self._partial += data
                    self._check_partial()
                    return items
                self._partial += data[:nl]
                line = bytes(self._partial)
                self._partial.clear()
                self._line(line, items)
                start = nl + 1
            find = data.find
            while True:
                nl = find(b"\n", start)
                if nl < 0:
                    break
                self._line(data[start:nl], items)
                start = nl + 1
            if start < len(data):
                self._partial += data[start:]
                self._check_partial()
        except ProtocolError as exc:
            exc.items = items
            self._error = exc
            self.close()
            raise
        return items

    def _end_of_stream(self) -> list[Item]:
        items: list[Item] = []
        if self.quit_sent:
            quit_id = self.quit_id
            if quit_id is not None and quit_id in self._pending:
                items.append(Reply(quit_id, {}, "quit"))
                del self._pending[quit_id]
            items.append(ConnectionLost(True, "QEMU quit"))
        else:
            items.append(ConnectionLost(False, "the peer closed it"))
        self._partial.clear()
        self.close()
        return items

    def _check_partial(self) -> None:
        if len(self._partial) > self.max_line:
            raise ProtocolError(
                f"message longer than the {self.max_line}-byte limit", bytes(self._partial[:200])
            )

    def _line(self, line: bytes, items: list[Item]) -> None:
        if len(line) > self.max_line:
            raise ProtocolError(f"message longer than the {self.max_line}-byte limit", line)
        try:
            text = line.decode()
        except UnicodeDecodeError:
            raise ProtocolError("message is not valid UTF-8", line) from None
        try:  # fast path: an object from the first byte, then only whitespace (\r)
            msg, end = _scan(text, 0)
            rest = len(text) - end
            if rest and not (rest == 1 and text[end] == "\r") and text[end:].strip():
                raise ValueError("extra data")
        except StopIteration:  # not at position 0: let the full decoder judge
            try:
                msg = _loads(text)
            except (ValueError, RecursionError):
                if not line.strip():
                    return  # blank line between messages: harmless
                raise ProtocolError("message is not valid JSON", line) from None
        except (ValueError, RecursionError):
            raise ProtocolError("message is not valid JSON", line) from None
        if type(msg) is not dict:
            raise ProtocolError("message is not a JSON object", line)
        if "event" in msg:
            items.append(self._event(msg, line))
        elif "return" in msg or "error" in msg:
            reply = self._reply(msg, line)
            if reply is not None:
                items.append(reply)
        elif "QMP" in msg:
            items.append(self._greeting(msg, line))
        else:
            raise ProtocolError("message is neither a reply, an event nor a greeting", line)

    def _greeting(self, msg: dict[str, Any], line: bytes) -> Greeting:
        if self.state is not State.GREETING:
            raise ProtocolError("unexpected second greeting", line)
        body = msg["QMP"]
        if type(body) is not dict:
            raise ProtocolError("malformed greeting", line)
        version, caps = body.get("version"), body.get("capabilities")
        if type(version) is not dict or type(caps) is not list:
            raise ProtocolError("malformed greeting", line)
        if not all(type(c) is str for c in caps):
            raise ProtocolError("malformed greeting capabilities", line)
        qemu = version.get("qemu", {})
        triple = (0, 0, 0)
        if type(qemu) is dict and qemu:
            parts = (qemu.get("major"), qemu.get("minor"), qemu.get("micro"))
            if not all(_is_int(p) for p in parts):
                raise ProtocolError("malformed greeting version", line)
            triple = parts  # type: ignore[assignment]
        self.greeting = Greeting(version, tuple(caps), msg, triple)
        self.state = State.GREETED
        return self.greeting

    def _reply(self, msg: dict[str, Any], line: bytes) -> Reply | ErrorReply | None:
        if self.state is State.GREETING:
            raise ProtocolError("expected a greeting", line)
        id_ = msg.get("id")
        if type(id_) is not int:
            raise ProtocolError("reply without a valid id", line)
        pending = self._pending.pop(id_, None)
        if pending is None:
            if id_ in self._abandoned:
                self._abandoned.discard(id_)
                self.late_replies += 1
                return None
            raise ProtocolError(f"reply to unknown id {id_}", line)
        if "return" in msg:
            value = msg["return"]
            if id_ == self._negotiate_id:
                self.state = State.RUNNING
            return Reply(id_, value, pending.name)
        err = msg["error"]
        if type(err) is not dict or type(err.get("class")) is not str:
            raise ProtocolError("malformed error reply", line)
        desc = err.get("desc")
        if type(desc) is not str:
            desc = ""
        if id_ == self._negotiate_id:
            self.state = State.GREETED
            self.oob_enabled = False
        return ErrorReply(id_, err["class"], desc, pending.name, pending.arguments)

    def _event(self, msg: dict[str, Any], line: bytes) -> Event:
        if self.state is State.GREETING:
            raise ProtocolError("expected a greeting", line)
        name = msg["event"]
        data = msg.get("data", {})
        ts = msg.get("timestamp")
        if type(name) is not str or type(data) is not dict or type(ts) is not dict:
            raise ProtocolError("malformed event", line)
        sec, usec = ts.get("seconds"), ts.get("microseconds")
        if not _is_int(sec) or not _is_int(usec):
            raise ProtocolError("malformed event timestamp", line)
        return Event(name, data, sec, usec)
