"""A blocking QMP client: one socket, no threads, no event loop.

It reads only while a call waits (for a reply or an event), so an idle client
costs nothing. Thread-safe: calls are serialised by a lock, and `close()` from
another thread wakes a blocked call at once.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

from .._util.deadline import Deadline
from ..errors import Disconnected, ProtocolError, Timeout
from . import _transport
from ._client import CONNECT_TIMEOUT, DEFAULT_TIMEOUT, ClientBase, TimeoutArg
from .events import NameFilter, describe
from .protocol import DEFAULT_MAX_LINE, ErrorReply, Event, Greeting, Item, Reply
from .schema import Schema

_RECV = 65536


class QMPClient(ClientBase):
    """Blocking QMP client over a connected socket.

    Use `QMPClient.connect(address)` for a path, `host:port`, socket or fd.
    `timeout` is the default for every call; pass `timeout=None` to a call to
    wait without limit (only when you mean it).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        history: int = 1000,
        max_line: int = DEFAULT_MAX_LINE,
        name: str = "",
    ) -> None:
        super().__init__(sock, timeout=timeout, history=history, max_line=max_line, name=name)
        self._replies: dict[int, Reply | ErrorReply] = {}
        self._lock = threading.Lock()
        sock.setblocking(True)

    # -- connecting -------------------------------------------------------

    @classmethod
    def connect(
        cls,
        address: _transport.Address,
        *,
        negotiate: bool = True,
        oob: bool = False,
        connect_timeout: float | None = CONNECT_TIMEOUT,
        timeout: float | None = DEFAULT_TIMEOUT,
        history: int = 1000,
        max_line: int = DEFAULT_MAX_LINE,
        validate: bool = False,
    ) -> QMPClient:
        """Connect, read the greeting and (by default) negotiate capabilities.

        `validate=True` fetches QEMU's schema once and checks every command
        against it before sending (`ValidationError`, with suggestions)."""
        deadline = Deadline(connect_timeout)
        name = _transport.describe(address)
        if isinstance(address, (socket.socket, int)):
            sock = _transport.adopt(address)
        else:
            sock = _connect(address, deadline, name)
        client = cls(sock, timeout=timeout, history=history, max_line=max_line, name=name)
        try:
            client.read_greeting(timeout=deadline.remaining())
            if negotiate:
                client.negotiate(oob=oob, timeout=deadline.remaining())
            if validate:
                client.fetch_schema(timeout=deadline.remaining())
                client.validate = True
        except BaseException:
            client.close()
            raise
        return client

    def read_greeting(self, *, timeout: TimeoutArg = ...) -> Greeting:
        with self._lock:
            deadline = self._deadline(timeout)
            while self._core.greeting is None:
                self._receive(deadline, f"the QMP greeting from {self.name}", fatal=True)
            return self._core.greeting

    def negotiate(self, *, oob: bool = False, timeout: TimeoutArg = ...) -> None:
        """Send `qmp_capabilities` (enabling OOB if asked) and wait for the answer."""
        if self._core.greeting is None:
            self.read_greeting(timeout=timeout)
        with self._lock:
            self._check_open()
            id_, data = self._core.negotiate(["oob"] if oob else [])
            self._roundtrip(id_, data, (), self._deadline(timeout), "qmp_capabilities")

    # -- commands ---------------------------------------------------------

    def execute(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: TimeoutArg = ...,
    ) -> Any:
        """Run command `name`; return its `return` value or raise `CommandError`."""
        return self._execute(name, arguments, False, (), timeout)

    def execute_oob(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: TimeoutArg = ...,
    ) -> Any:
        """Run `name` out-of-band (needs `oob=True` at connect)."""
        return self._execute(name, arguments, True, (), timeout)

    def send_fd(self, fd: int, fdname: str, *, timeout: TimeoutArg = ...) -> None:
        """Pass `fd` to QEMU under `fdname` (SCM_RIGHTS + `getfd`)."""
        self._execute("getfd", {"fdname": fdname}, False, (_transport.check_fd(fd),), timeout)

    def add_fd(
        self,
        fd: int,
        *,
        fdset_id: int | None = None,
        opaque: str | None = None,
        timeout: TimeoutArg = ...,
    ) -> dict[str, Any]:
        """Add `fd` to an fd set (`add-fd`); returns `{"fdset-id": N, "fd": M}`."""
        args: dict[str, Any] = {}
        if fdset_id is not None:
            args["fdset-id"] = fdset_id
        if opaque is not None:
            args["opaque"] = opaque
        result: dict[str, Any] = self._execute(
            "add-fd", args, False, (_transport.check_fd(fd),), timeout
        )
        return result

    def fetch_schema(self, *, timeout: TimeoutArg = ...) -> Schema:
        """QEMU's `query-qmp-schema`, fetched once per connection."""
        if self.schema is None:
            self.schema = Schema(self._execute("query-qmp-schema", None, False, (), timeout))
        return self.schema

    def _execute(
        self,
        name: str,
        arguments: Mapping[str, Any] | None,
        oob: bool,
        fds: Sequence[int],
        timeout: TimeoutArg,
    ) -> Any:
        self._check_command(name, arguments)
        deadline = self._deadline(timeout)
        with self._lock:
            self._check_open()
            id_, data = self._core.send_command(name, arguments, oob=oob)
            return self._roundtrip(id_, data, fds, deadline, name)

    def _roundtrip(
        self, id_: int, data: bytes, fds: Sequence[int], deadline: Deadline, name: str
    ) -> Any:
        reply = self._roundtrip_item(id_, data, fds, deadline, name)
        if isinstance(reply, Reply):
            return reply.value
        raise reply.error()

    def _roundtrip_item(
        self, id_: int, data: bytes, fds: Sequence[int], deadline: Deadline, name: str
    ) -> Reply | ErrorReply:
        self._send(data, fds, name)
        replies = self._replies
        while True:
            reply = replies.pop(id_, None)
            if reply is not None:
                return reply
            try:
                self._receive(deadline, f"the reply to {name!r}", fatal=True)
            except Disconnected:
                if name == "quit" and self._core.quit_sent:
                    return Reply(id_, {}, name)  # QEMU left before answering quit: success
                raise

    def execute_message(
        self, message: Mapping[str, Any], *, timeout: TimeoutArg = ...
    ) -> dict[str, Any]:
        """Send a command given as a QMP message (`{"execute": ..., "arguments":
        ...}`) and return QEMU's response as a message: `{"return": ...}` or
        `{"error": {"class", "desc"}}`, never raising for an error reply. For
        code written against raw QMP messages."""
        oob = "exec-oob" in message
        name = message.get("exec-oob" if oob else "execute")
        if not isinstance(name, str):
            raise TypeError(f'a QMP message needs "execute": "<name>", not {message!r}')
        deadline = self._deadline(timeout)
        with self._lock:
            self._check_open()
            id_, data = self._core.send_command(name, message.get("arguments"), oob=oob)
            reply = self._roundtrip_item(id_, data, (), deadline, name)
        if isinstance(reply, Reply):
            return {"return": reply.value}
        return {"error": {"class": reply.error_class, "desc": reply.desc}}

    def pass_fd(self, fd: int) -> None:
        """Send `fd` alone (SCM_RIGHTS on a whitespace byte); QEMU keeps it for
        the next `getfd` / `add-fd` on this connection."""
        _transport.check_fd(fd)
        with self._lock:
            self._check_open()
            self._send(b" ", (fd,), "an fd")

    def poll_events(self) -> None:
        """Read whatever QEMU has already sent (events), without waiting."""
        with self._lock:
            if self._sock is None:
                return
            with contextlib.suppress(Timeout):
                while True:
                    self._receive(Deadline(0), "nothing", fatal=False)

    def _send(self, data: bytes, fds: Sequence[int], name: str) -> None:
        sock = self._sock
        assert sock is not None
        try:
            if fds:
                sent = _transport.sendmsg_fds(sock, data, fds)
                if sent < len(data):
                    sock.sendall(data[sent:])
            else:
                sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            reason = "QEMU quit" if self._core.quit_sent else "the peer closed it"
            self._lost(reason)
            raise Disconnected(
                f"QMP connection to {self.name} closed ({reason}) while sending {name!r}"
            ) from exc
        except OSError as exc:
            self._lost(f"sending {name!r} failed: {exc}")
            raise Disconnected(f"cannot send {name!r} to {self.name}: {exc}") from exc

    # -- reading ----------------------------------------------------------

    def _receive(self, deadline: Deadline, what: str, *, fatal: bool) -> None:
        """Read once (waiting until `deadline`) and dispatch what arrived.

        `fatal`: a timeout breaks the connection (a command was left without
        its reply, so the stream can no longer be trusted).
        """
        sock = self._sock
        if sock is None:
            raise Disconnected(f"QMP connection to {self.name} is closed ({self._closed_reason})")
        sock.settimeout(deadline.remaining())
        try:
            data = sock.recv(_RECV)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: no time was left
            if fatal:
                self._lost(f"no answer within {deadline.timeout:g} s while waiting for {what}")
            raise Timeout(what, deadline.timeout) from None
        except (ConnectionResetError, BrokenPipeError):
            data = b""  # the peer went away with our data unread: same as EOF
        except OSError as exc:
            self._lost(f"receive failed: {exc}")
            raise Disconnected(f"QMP connection to {self.name} failed: {exc}") from exc
        if not data:
            reason = "closed by the client" if self._closed_reason else "the peer closed it"
            if self._core.quit_sent:
                reason = "QEMU quit"
            self._lost(reason)
            raise Disconnected(
                f"QMP connection to {self.name} closed ({reason}) while waiting for {what}"
            )
        try:
            items = self._core.receive_data(data)
        except ProtocolError as exc:
            self._dispatch(exc.items)
            self._lost(f"protocol error: {exc}")
            raise
        self._dispatch(items)

    def _dispatch(self, items: list[Item]) -> None:
        for item in items:
            if isinstance(item, (Reply, ErrorReply)):
                self._replies[item.id] = item
            elif isinstance(item, Event):
                self._events.notify(item)
                self._events.push(item)

    # -- events -----------------------------------------------------------

    def wait_event(
        self,
        name: NameFilter = None,
        match: Mapping[str, Any] | None = None,
        *,
        timeout: TimeoutArg = ...,
    ) -> Event:
        """Return (and consume) the oldest event matching `name`/`match`,
        waiting for one if none has arrived yet."""
        deadline = self._deadline(timeout)
        with self._lock:
            while True:
                event = self._events.take(name, match)
                if event is not None:
                    return event
                if self._sock is None:
                    raise Disconnected(
                        f"QMP connection to {self.name} is closed ({self._closed_reason}); "
                        f"no {describe(name, match)} arrived"
                    )
                try:
                    self._receive(deadline, describe(name, match), fatal=False)
                except Disconnected:
                    if self._events.queue:
                        continue  # events that came with the EOF are still there
                    raise

    def events(self, *, timeout: TimeoutArg = ...) -> Iterator[Event]:
        """Yield events as they arrive (consuming them) until the connection
        closes; each wait is bounded by `timeout` (raises `Timeout`)."""
        while True:
            try:
                event = self.wait_event(timeout=timeout)
            except Disconnected:
                return
            yield event

    # -- closing ----------------------------------------------------------

    def close(self) -> None:
        """Close the connection; a call blocked in another thread fails at once."""
        if self._closed_reason is None:
            self._closed_reason = "closed by the client"
        if self._lock.acquire(blocking=False):
            try:
                self._lost(self._closed_reason)
            finally:
                self._lock.release()
        else:
            sock = self._sock
            if sock is not None:
                # wakes the thread blocked in recv(); it finishes the close
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _lost(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        self._core.close()
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _connect(address: _transport.Address, deadline: Deadline, name: str) -> socket.socket:
    errors: list[str] = []
    for family, sockaddr in _transport.targets(address):
        infos: list[tuple[int, Any]]
        if family == socket.AF_UNIX:
            infos = [(family, sockaddr)]
        else:
            assert isinstance(sockaddr, tuple)
            host, port = sockaddr
            try:
                infos = [
                    (fam, sa)
                    for fam, _, _, _, sa in socket.getaddrinfo(
                        host, port, family, socket.SOCK_STREAM
                    )
                ]
            except OSError as exc:
                errors.append(f"{host}: {exc}")
                continue
        for fam, sa in infos:
            sock = socket.socket(fam, socket.SOCK_STREAM)
            sock.settimeout(deadline.remaining())
            try:
                sock.connect(sa)
                return sock
            except (TimeoutError, BlockingIOError):  # BlockingIOError: no time was left
                sock.close()
                raise Timeout(f"connecting to {name}", deadline.timeout) from None
            except OSError as exc:
                sock.close()
                errors.append(f"{sa}: {exc.strerror or exc}")
    raise Disconnected(f"cannot connect to QMP at {name}: " + "; ".join(errors))
