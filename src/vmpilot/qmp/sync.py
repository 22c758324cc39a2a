"""A blocking QMP client: one socket, no threads of its own, no event loop.

It reads only while a call waits (for a reply or an event), so an idle client
costs nothing. Thread-safe by a leader/follower scheme: at most one waiting
thread reads the socket (the reader); the others wait on a condition, each
with its own deadline, and whichever call finds the reader role free takes
it. Every chunk read is dispatched for all (replies by id, events to the
queue), so a command issued while another thread waits for an event
completes in one round trip. Sends are serialised by their own lock. No lock
is held across a blocking system call except that send lock, and its wait
is bounded by the caller's deadline; `close()` from any thread wakes every
call at once.

The socket stays in blocking mode and a command costs what it costs a plain
blocking client, two system calls: `send(MSG_DONTWAIT)` and `recv`, the
latter bounded by the kernel's receive timeout (SO_RCVTIMEO), kept within
the deadline and changed only when it must be (see `_fit_rcvtimeo`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, cast

from .._util.deadline import Deadline
from .._util.plan import run
from ..errors import Disconnected, ProtocolError, QMPError, Timeout
from . import _transport
from ._client import (
    CLIENT_TIMEOUT,
    CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    ClientBase,
    TimeoutArg,
    connect_plan,
    message_command,
    reply_message,
    send_failed,
    traffic,
)
from .events import NameFilter, describe
from .protocol import DEFAULT_MAX_LINE, ConnectionLost, ErrorReply, Event, Greeting, Item, Reply
from .schema import Schema

_RECV = 65536
_TIMEVAL = struct.Struct("@ll")  # struct timeval
_POLL_BURST = 64  # poll_events reads at most this many chunks (a flooding peer cannot pin it)
_T = TypeVar("_T")
_DEBUG = logging.DEBUG


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
        self._mutex = threading.Lock()  # guards all state; never held across a blocking call
        self._cond = threading.Condition(self._mutex)  # "something arrived / the reader left"
        self._send_lock = threading.Lock()  # one message on the wire at a time
        self._reading = False  # a thread is the reader (in recv, without _mutex)
        self._followers = 0  # threads waiting on _cond (notified only if any)
        self._users = 0  # senders using the fd outside _mutex (and the reader, if _reading)
        self._shut: socket.socket | None = None  # closed connection, fd still in use
        self._broken: ProtocolError | None = None
        sock.setblocking(True)
        self._rcvtimeo = 0.0  # SO_RCVTIMEO now (0: none); see _fit_rcvtimeo

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
            sock = run(connect_plan(address, deadline, name), _Connector)
        client = cls(sock, timeout=timeout, history=history, max_line=max_line, name=name)
        try:
            client.read_greeting(timeout=deadline)
            if negotiate:
                client.negotiate(oob=oob, timeout=deadline)
            if validate:
                client.fetch_schema(timeout=deadline)
                client.validate = True
        except BaseException:
            client.close()
            raise
        return client

    def read_greeting(self, *, timeout: TimeoutArg = CLIENT_TIMEOUT) -> Greeting:
        core = self._core
        return self._await(
            lambda: core.greeting,
            self._deadline(timeout),
            lambda: f"the QMP greeting from {self.name}",
            True,
        )

    def negotiate(self, *, oob: bool = False, timeout: TimeoutArg = CLIENT_TIMEOUT) -> None:
        """Send `qmp_capabilities` (enabling OOB if asked) and wait for the answer."""
        deadline = self._deadline(timeout)
        self.read_greeting(timeout=deadline)
        enable = ["oob"] if oob else []
        reply = self._roundtrip(
            lambda: self._core.negotiate(enable), (), deadline, "qmp_capabilities"
        )
        if isinstance(reply, ErrorReply):
            raise reply.error()

    # -- commands ---------------------------------------------------------

    def execute(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: TimeoutArg = CLIENT_TIMEOUT,
    ) -> Any:
        """Run command `name`; return its `return` value or raise `CommandError`."""
        return self._execute(name, arguments, False, (), timeout)

    def execute_oob(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: TimeoutArg = CLIENT_TIMEOUT,
    ) -> Any:
        """Run `name` out-of-band (needs `oob=True` at connect)."""
        return self._execute(name, arguments, True, (), timeout)

    def execute_message(
        self, message: Mapping[str, Any], *, timeout: TimeoutArg = CLIENT_TIMEOUT
    ) -> dict[str, Any]:
        """Send a command given as a QMP message (`{"execute": ..., "arguments":
        ...}`) and return QEMU's response as a message: `{"return": ...}` or
        `{"error": {"class", "desc"}}`, never raising for an error reply. For
        code written against raw QMP messages."""
        name, arguments, oob = message_command(message)
        deadline = self._deadline(timeout)
        core = self._core
        reply = self._roundtrip(
            lambda: core.send_command(name, arguments, oob=oob), (), deadline, name
        )
        return reply_message(reply)

    def send_fd(self, fd: int, fdname: str, *, timeout: TimeoutArg = CLIENT_TIMEOUT) -> None:
        """Pass `fd` to QEMU under `fdname` (SCM_RIGHTS + `getfd`)."""
        self._execute("getfd", {"fdname": fdname}, False, (_transport.check_fd(fd),), timeout)

    def add_fd(
        self,
        fd: int,
        *,
        fdset_id: int | None = None,
        opaque: str | None = None,
        timeout: TimeoutArg = CLIENT_TIMEOUT,
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

    def pass_fd(self, fd: int, *, timeout: TimeoutArg = CLIENT_TIMEOUT) -> None:
        """Send `fd` alone (SCM_RIGHTS on a whitespace byte); QEMU keeps it for
        the next `getfd` / `add-fd` on this connection."""
        fds = (_transport.check_fd(fd),)
        self._send(lambda: (None, b" "), fds, self._deadline(timeout), "an fd")

    def fetch_schema(self, *, timeout: TimeoutArg = CLIENT_TIMEOUT) -> Schema:
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
        if self.validate:
            self._check_command(name, arguments)
        deadline = self._deadline(timeout)
        core = self._core
        reply = self._roundtrip(
            lambda: core.send_command(name, arguments, oob=oob), fds, deadline, name
        )
        if type(reply) is Reply:
            return reply.value
        raise reply.error()  # type: ignore[union-attr]

    def _roundtrip(
        self,
        encode: Callable[[], tuple[int, bytes]],
        fds: Sequence[int],
        deadline: Deadline,
        name: str,
    ) -> Reply | ErrorReply:
        if fds:
            id_: int = self._send(encode, fds, deadline, name)
            self._mutex.acquire()
        else:
            id_ = self._send_held(encode, deadline, name)
        # `_mutex` is held from here: the reply may be waited for at once
        try:
            reply = self._replies.pop(id_, None)
            if reply is not None:
                return reply
            replies = self._replies

            def arrived() -> Reply | ErrorReply | None:
                return replies.pop(id_, None)

            found = self._wait(arrived, deadline, lambda: f"the reply to {name!r}", True)
            return cast("Reply | ErrorReply", found)
        finally:
            self._mutex.release()

    def poll_events(self) -> None:
        """Read whatever QEMU has already sent (events), without waiting."""
        with self._mutex:
            for _ in range(_POLL_BURST):
                if self._sock is None or self._reading or not self._read(0):
                    return

    # -- sending ----------------------------------------------------------

    def _send_held(
        self, encode: Callable[[], tuple[int, bytes]], deadline: Deadline, name: str
    ) -> int:
        """`_send` for a message without fds, returning with `_mutex` held.
        The common case (no other sender, the kernel takes it all) costs one
        non-blocking send under the state lock and no more lock traffic; any
        other case goes the way of `_send`."""
        mutex = self._mutex
        send_lock = self._send_lock
        mutex.acquire()
        if not send_lock.acquire(False):
            mutex.release()
            id_: int = self._send(encode, (), deadline, name)
            mutex.acquire()
            return id_
        try:
            sock = self._sock
            if sock is None:
                raise self._gone(f"sending {name!r}")
            id_, data = encode()
        except BaseException:
            send_lock.release()
            mutex.release()
            raise
        if traffic.isEnabledFor(_DEBUG):
            self._log_sent(data)
        try:
            sent = sock.send(data, socket.MSG_DONTWAIT)  # never blocks: fine under the lock
        except OSError:
            sent = -1  # the slow path retries and reports it
        if sent == len(data):
            send_lock.release()
            return id_
        self._users += 1  # the rest goes without `_mutex`, as in `_send`
        mutex.release()
        try:
            self._send_bytes(sock, data, (), deadline, name, id_, max(sent, 0))
        finally:
            with mutex:
                self._leave()
            send_lock.release()
        mutex.acquire()
        return id_

    def _send(
        self,
        encode: Callable[[], tuple[int | None, bytes]],
        fds: Sequence[int],
        deadline: Deadline,
        name: str,
    ) -> Any:
        """Encode (under the state lock, so ids go out in order) and send one
        message; returns its id. A deadline that passes before the first byte
        left takes the command back (`Timeout`, the connection stays usable);
        one that passes half-way through breaks the connection."""
        send_lock = self._send_lock
        if not send_lock.acquire(False):
            remaining = deadline.remaining()
            if not send_lock.acquire(timeout=-1 if remaining is None else remaining):
                raise Timeout(f"sending {name!r} (another thread is sending)", deadline.timeout)
        try:
            with self._mutex:
                sock = self._sock
                if sock is None:
                    raise self._gone(f"sending {name!r}")
                id_, data = encode()
                self._users += 1
            if traffic.isEnabledFor(_DEBUG):
                self._log_sent(data)
            try:
                try:  # the common case inline: all of it at once
                    sent = -1 if fds else sock.send(data, socket.MSG_DONTWAIT)
                except OSError:
                    sent = -1  # the slow path retries and reports it
                if sent != len(data):
                    self._send_bytes(sock, data, fds, deadline, name, id_, max(sent, 0))
            finally:
                with self._mutex:
                    self._leave()
        finally:
            send_lock.release()
        return id_

    def _send_bytes(
        self,
        sock: socket.socket,
        data: bytes,
        fds: Sequence[int],
        deadline: Deadline,
        name: str,
        id_: int | None,
        sent: int,
    ) -> None:
        while True:
            try:
                if fds and not sent:
                    sent = _transport.sendmsg_fds(sock, data, fds, socket.MSG_DONTWAIT)
                else:
                    sent += sock.send(data[sent:] if sent else data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            except OSError as exc:
                with self._mutex:
                    if self._closed_reason is not None:
                        raise self._gone(f"sending {name!r}") from exc
                    reason, err = send_failed(exc, name, self._core.quit_sent, self.name)
                    self._lost(reason)
                raise err from exc
            if sent == len(data):
                return
            if _writable(sock, deadline):
                continue
            with self._mutex:
                if not sent:
                    if id_ is not None:
                        self._core.unsend(id_)
                else:
                    self._lost(f"sending {name!r} timed out half-way through")
            raise Timeout(f"sending {name!r}", deadline.timeout)

    # -- waiting and reading ----------------------------------------------

    def _await(
        self,
        check: Callable[[], _T | None],
        deadline: Deadline,
        what: Callable[[], str],
        fatal: bool,
    ) -> _T:
        """Wait until `check()` (called under the state lock) returns a result,
        reading the socket if no other thread is. `fatal`: running out of time
        breaks the connection (a command sent was left without its reply, so
        the stream can no longer be trusted)."""
        with self._mutex:
            return self._wait(check, deadline, what, fatal)

    def _wait(
        self,
        check: Callable[[], _T | None],
        deadline: Deadline,
        what: Callable[[], str],
        fatal: bool,
    ) -> _T:
        """`_await` with `_mutex` already held."""
        waited = drained = False
        while True:
            found = check()
            if found is not None:
                return found
            if self._sock is None:
                raise self._gone(what(), waited)
            remaining = deadline.remaining()
            if remaining == 0:
                if not drained and not self._reading:
                    drained = True  # once: what the kernel already holds has arrived
                    self._read(0)
                    continue
                awaited = what()
                if fatal:
                    self._lost(
                        f"no answer within {deadline.timeout:g} s while waiting for {awaited}"
                    )
                raise Timeout(awaited, deadline.timeout)
            if self._reading:
                self._followers += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._followers -= 1
            else:
                self._read(remaining)
            waited = True

    def _read(self, remaining: float | None) -> bool:
        """As the reader: wait for data for `remaining` seconds (None: no
        limit, 0: only what is there) and dispatch it.
        Called and returns with `_mutex` held; releases it while in the
        kernel. Returns whether anything was read."""
        sock = self._sock
        assert sock is not None
        self._reading = True  # counts as a user of the fd (see _lost)
        data: bytes | None = None
        error: OSError | None = None
        self._mutex.release()
        try:
            if remaining == 0:
                data = sock.recv(_RECV, socket.MSG_DONTWAIT)
            else:
                if remaining is not None and not (
                    self._rcvtimeo <= remaining <= self._rcvtimeo * 8
                ):
                    self._fit_rcvtimeo(sock, remaining)
                data = sock.recv(_RECV)  # the socket's receive timeout bounds it
        except BlockingIOError:
            pass  # nothing yet (the receive timeout ran out): the caller loops
        except (ConnectionResetError, BrokenPipeError):
            data = b""  # the peer went away with our data unread: same as EOF
        except OSError as exc:
            error = exc
        finally:
            self._mutex.acquire()
            self._reading = False
            if self._shut is not None and not self._users:
                self._shut.close()
                self._shut = None
            if self._followers:
                self._cond.notify_all()
        if self._sock is None:  # closed meanwhile
            return False
        if error is not None:
            self._lost(f"receive failed: {error}")
            return False
        if data is None:
            return False
        try:
            items = self._core.receive_data(data)
        except ProtocolError as exc:
            self._dispatch(exc.items)
            self._broken = exc
            self._lost(f"protocol error: {exc}")
            return True
        self._dispatch(items)
        return True

    def _fit_rcvtimeo(self, sock: socket.socket, remaining: float) -> None:
        """Keep the kernel's receive timeout (SO_RCVTIMEO) within `remaining`,
        so a blocking recv never outlasts the deadline, yet change it (a system
        call) rarely: it is set to half of what is left, and reset only when it
        would overshoot or is far shorter than needed. A recv that times out
        early just makes the caller loop."""
        new = remaining / 2
        sec = int(new)
        usec = int((new - sec) * 1e6) or (0 if sec else 1)  # all zero would mean "never"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(sec, usec))
        self._rcvtimeo = sec + usec / 1e6

    def _dispatch(self, items: list[Item]) -> None:
        if traffic.isEnabledFor(_DEBUG):
            self._log_received(items)
        for item in items:
            if isinstance(item, (Reply, ErrorReply)):
                self._replies[item.id] = item
            elif isinstance(item, Event):
                self._events.notify(item)
                self._events.push(item)
            elif isinstance(item, ConnectionLost):
                self._lost(item.reason)

    def _gone(self, what: str, waited: bool = False) -> Exception:
        """The error for a call that finds the connection closed: the protocol
        error itself for a call that was waiting when it broke the connection."""
        if waited and self._broken is not None:
            err = ProtocolError(str(self._broken))
            err.data = self._broken.data
            return err
        return Disconnected(
            f"QMP connection to {self.name} closed ({self._closed_reason}) while {what}"
            if what.startswith("sending")
            else f"QMP connection to {self.name} closed ({self._closed_reason}) "
            f"while waiting for {what}"
        )

    # -- events -----------------------------------------------------------

    def wait_event(
        self,
        name: NameFilter = None,
        match: Mapping[str, Any] | None = None,
        *,
        timeout: TimeoutArg = CLIENT_TIMEOUT,
    ) -> Event:
        """Return (and consume) the oldest event matching `name`/`match`,
        waiting for one if none has arrived yet."""
        deadline = self._deadline(timeout)
        take = self._events.take
        try:
            return self._await(
                lambda: take(name, match), deadline, lambda: describe(name, match), False
            )
        except Disconnected as exc:
            raise Disconnected(f"{exc}; no {describe(name, match)} arrived") from None

    def events(self, *, timeout: TimeoutArg = CLIENT_TIMEOUT) -> Iterator[Event]:
        """Yield events as they arrive (consuming them) until the connection
        closes; each wait is bounded by `timeout` (raises `Timeout`)."""
        while True:
            try:
                event = self.wait_event(timeout=timeout)
            except Disconnected:
                return
            yield event

    def _read_to_end(self, timeout: float) -> None:
        """For a peer known to be gone: read (bounded) what it sent before
        leaving, up to its end of stream, so a last reply or event (a
        `quit`'s answer, SHUTDOWN) is delivered rather than lost to `close`."""
        with contextlib.suppress(QMPError, Timeout):
            self._await(
                lambda: True if self._sock is None else None,
                Deadline(timeout),
                lambda: "the end of stream",
                False,
            )

    # -- closing ----------------------------------------------------------

    def close(self) -> None:
        """Close the connection; a call blocked in another thread fails at once."""
        with self._mutex:
            self._lost("closed by the client")

    def _lost(self, reason: str) -> None:
        """Close for `reason` (the first reason sticks); with `_mutex` held.
        A thread still in a system call on the fd is woken by `shutdown`, and
        the fd is closed when the last such thread leaves (never under it)."""
        if self._closed_reason is None:
            self._closed_reason = reason
        self._core.close()
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._users or self._reading:
                self._shut = sock
                with contextlib.suppress(OSError):  # already disconnected: its call fails
                    sock.shutdown(socket.SHUT_RDWR)
            else:
                sock.close()
        self._cond.notify_all()

    def _leave(self) -> None:
        self._users -= 1
        if not self._users and not self._reading and self._shut is not None:
            self._shut.close()
            self._shut = None

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _writable(sock: socket.socket, deadline: Deadline) -> bool:
    """Wait until `sock` can take more bytes or `deadline` passes (False)."""
    remaining = deadline.remaining()
    if remaining == 0:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    return bool(poller.poll(-1 if remaining is None else math.ceil(remaining * 1000)))


class _Connector:
    """The blocking primitives of `connect_plan`."""

    @staticmethod
    def resolve(host: str, port: int, family: int) -> list[tuple[int, Any]]:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        return [(fam, sa) for fam, _, _, _, sa in infos]

    @staticmethod
    def connect(family: int, sockaddr: Any, deadline: Deadline) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(deadline.remaining())
            sock.connect(sockaddr)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: no time was left
            sock.close()
            raise Timeout("connecting", deadline.timeout) from None
        except BaseException:
            sock.close()
            raise
        return sock
