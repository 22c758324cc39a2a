"""An asyncio QMP client over the same sans-I/O core.

The socket is read by a loop reader callback (no task, no stream objects):
each chunk goes through the core and replies complete their futures at once.
Many commands can be in flight; every future we create is awaited by the call
that made it, so no exception is ever left unretrieved.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from collections.abc import Generator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from .._util.deadline import Deadline
from .._util.plan import arun
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
from .events import NameFilter, describe, event_matches
from .protocol import DEFAULT_MAX_LINE, ConnectionLost, ErrorReply, Event, Greeting, Item, Reply
from .schema import Schema

_RECV = 65536
_POLL_BURST = 64
_DEBUG = logging.DEBUG
_T = TypeVar("_T")
_EventWaiter = tuple[NameFilter, "Mapping[str, Any] | None", "asyncio.Future[Event]"]


class AsyncQMPClient(ClientBase):
    """Asyncio QMP client bound to the running loop.

    Use `await AsyncQMPClient.connect(address)` or
    `async with AsyncQMPClient.connect(address) as qmp:`.
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
        self._loop = asyncio.get_running_loop()
        super().__init__(sock, timeout=timeout, history=history, max_line=max_line, name=name)
        self._fd = sock.fileno()
        sock.setblocking(False)
        self._waiters: dict[int, asyncio.Future[Reply | ErrorReply]] = {}
        self._event_waiters: list[_EventWaiter] = []
        self._greeting: asyncio.Future[Greeting] = self._loop.create_future()
        self._wbuf: collections.deque[tuple[memoryview, Sequence[int]]] = collections.deque()
        # waits with a deadline: key -> (future, deadline, timeout, what, fatal); see _wait
        self._timed: dict[object, tuple[asyncio.Future[Any], float, float | None, str, bool]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._loop.add_reader(self._fd, self._on_readable)

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
    ) -> _Connecting:
        """Connect, read the greeting and (by default) negotiate capabilities.

        Await the result, or use it directly in `async with`. `validate=True`:
        see `QMPClient.connect`.
        """
        return _Connecting(
            cls._connect(
                address, negotiate, oob, connect_timeout, timeout, history, max_line, validate
            )
        )

    @classmethod
    async def _connect(
        cls,
        address: _transport.Address,
        negotiate: bool,
        oob: bool,
        connect_timeout: float | None,
        timeout: float | None,
        history: int,
        max_line: int,
        validate: bool,
    ) -> AsyncQMPClient:
        deadline = Deadline(connect_timeout)
        name = _transport.describe(address)
        if isinstance(address, (socket.socket, int)):
            sock = _transport.adopt(address)
        else:
            sock = await arun(connect_plan(address, deadline, name), _Connector())
        client = cls(sock, timeout=timeout, history=history, max_line=max_line, name=name)
        try:
            await client.read_greeting(timeout=deadline)
            if negotiate:
                await client.negotiate(oob=oob, timeout=deadline)
            if validate:
                await client.fetch_schema(timeout=deadline)
                client.validate = True
        except BaseException:
            client.close()
            raise
        return client

    async def read_greeting(self, *, timeout: TimeoutArg = CLIENT_TIMEOUT) -> Greeting:
        return await self._wait(self._greeting, self._deadline(timeout), "the QMP greeting", True)

    async def negotiate(self, *, oob: bool = False, timeout: TimeoutArg = CLIENT_TIMEOUT) -> None:
        """Send `qmp_capabilities` (enabling OOB if asked) and wait for the answer."""
        deadline = self._deadline(timeout)
        await self.read_greeting(timeout=deadline)
        self._check_open()
        id_, data = self._core.negotiate(["oob"] if oob else [])
        reply = await self._roundtrip(id_, data, (), deadline, "qmp_capabilities")
        if isinstance(reply, ErrorReply):
            raise reply.error()

    # -- commands ---------------------------------------------------------

    async def execute(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: TimeoutArg = CLIENT_TIMEOUT,
    ) -> Any:
        """Run command `name`; return its `return` value or raise `CommandError`."""
        return await self._execute(name, arguments, False, (), timeout)

    async def execute_oob(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: TimeoutArg = CLIENT_TIMEOUT,
    ) -> Any:
        """Run `name` out-of-band (needs `oob=True` at connect)."""
        return await self._execute(name, arguments, True, (), timeout)

    async def execute_message(
        self, message: Mapping[str, Any], *, timeout: TimeoutArg = CLIENT_TIMEOUT
    ) -> dict[str, Any]:
        """Send a command given as a QMP message (`{"execute": ..., "arguments":
        ...}`) and return QEMU's response as a message: `{"return": ...}` or
        `{"error": {"class", "desc"}}`, never raising for an error reply. For
        code written against raw QMP messages."""
        name, arguments, oob = message_command(message)
        deadline = self._deadline(timeout)
        self._check_open()
        id_, data = self._core.send_command(name, arguments, oob=oob)
        return reply_message(await self._roundtrip(id_, data, (), deadline, name))

    async def pass_fd(self, fd: int, *, timeout: TimeoutArg = CLIENT_TIMEOUT) -> None:
        """Send `fd` alone (SCM_RIGHTS on a whitespace byte); QEMU keeps it for
        the next `getfd` / `add-fd` on this connection. (Writes are buffered:
        this never waits, `timeout` is accepted for parity with `QMPClient`.)"""
        fds = (_transport.check_fd(fd),)
        self._deadline(timeout)  # validates
        self._check_open()
        self._write(b" ", fds, "an fd")

    async def send_fd(self, fd: int, fdname: str, *, timeout: TimeoutArg = CLIENT_TIMEOUT) -> None:
        """Pass `fd` to QEMU under `fdname` (SCM_RIGHTS + `getfd`)."""
        fds = (_transport.check_fd(fd),)
        await self._execute("getfd", {"fdname": fdname}, False, fds, timeout)

    async def add_fd(
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
        fds = (_transport.check_fd(fd),)
        result: dict[str, Any] = await self._execute("add-fd", args, False, fds, timeout)
        return result

    async def fetch_schema(self, *, timeout: TimeoutArg = CLIENT_TIMEOUT) -> Schema:
        """QEMU's `query-qmp-schema`, fetched once per connection."""
        if self.schema is None:
            entries = await self._execute("query-qmp-schema", None, False, (), timeout)
            self.schema = Schema(entries)
        return self.schema

    async def _execute(
        self,
        name: str,
        arguments: Mapping[str, Any] | None,
        oob: bool,
        fds: Sequence[int],
        timeout: TimeoutArg,
    ) -> Any:
        self._check_command(name, arguments)
        deadline = self._deadline(timeout)
        self._check_open()
        id_, data = self._core.send_command(name, arguments, oob=oob)
        reply = await self._roundtrip(id_, data, fds, deadline, name)
        if type(reply) is Reply:
            return reply.value
        raise reply.error()  # type: ignore[union-attr]

    async def _roundtrip(
        self, id_: int, data: bytes, fds: Sequence[int], deadline: Deadline, name: str
    ) -> Reply | ErrorReply:
        fut: asyncio.Future[Reply | ErrorReply] = self._loop.create_future()
        self._waiters[id_] = fut
        try:
            self._write(data, fds, name)
            return await self._wait(fut, deadline, f"the reply to {name!r}", True)
        finally:
            if self._waiters.pop(id_, None) is not None:
                self._core.abandon(id_)  # cancelled by the caller: drop a late reply

    async def _wait(
        self, fut: asyncio.Future[_T], deadline: Deadline, what: str, fatal: bool
    ) -> _T:
        """Await `fut` until `deadline`; on timeout fail it with `Timeout` and,
        if `fatal`, break the connection (an unanswered command poisons it).

        One loop timer serves every wait (armed for the earliest deadline,
        re-armed when it fires): a timer per command would cost more than
        the command's own round trip handling."""
        at = deadline.at
        if at is None or fut.done():
            return await fut
        key = object()  # not `fut`: two calls may await one future (the greeting)
        self._timed[key] = (fut, at, deadline.timeout, what, fatal)
        if self._timer is None or at < self._timer_at:
            self._arm(at)
        try:
            return await fut
        finally:
            del self._timed[key]

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_later(max(0.0, at - time.monotonic()), self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = time.monotonic()
        for fut, at, timeout, what, fatal in list(self._timed.values()):
            if at <= now and not fut.done():
                fut.set_exception(Timeout(what, timeout))
                if fatal:
                    self._lost(f"no answer within {timeout:g} s while waiting for {what}")
        pending = [at for fut, at, *_ in self._timed.values() if not fut.done()]
        if pending and self._sock is not None:
            self._arm(min(pending))

    # -- writing ----------------------------------------------------------

    def _write(self, data: bytes, fds: Sequence[int], name: str) -> None:
        sock = self._sock
        if sock is None:
            raise Disconnected(f"QMP connection to {self.name} is closed ({self._closed_reason})")
        if traffic.isEnabledFor(_DEBUG):
            self._log_sent(data)
        if self._wbuf:
            self._wbuf.append((memoryview(data), fds))
            return
        try:
            sent = _transport.sendmsg_fds(sock, data, fds) if fds else sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            reason, err = send_failed(exc, name, self._core.quit_sent, self.name)
            self._lost(reason)
            raise err from exc
        if sent < len(data):
            self._wbuf.append((memoryview(data)[sent:], () if sent else fds))
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        sock = self._sock
        while self._wbuf and sock is not None:
            view, fds = self._wbuf[0]
            try:
                sent = _transport.sendmsg_fds(sock, view, fds) if fds else sock.send(view)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lost(f"send failed: {exc}")
                return
            if sent < len(view):
                self._wbuf[0] = (view[sent:], ())
                return
            self._wbuf.popleft()
        if sock is not None:
            self._loop.remove_writer(self._fd)

    # -- reading ----------------------------------------------------------

    def _on_readable(self) -> bool:
        """Read and dispatch one chunk; returns whether the connection is still
        open and gave data."""
        sock = self._sock
        if sock is None:
            return False
        try:
            data = sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return False
        except (ConnectionResetError, BrokenPipeError):
            data = b""  # the peer went away with our data unread: same as EOF
        except OSError as exc:
            self._lost(f"receive failed: {exc}")
            return False
        try:  # b"" (end of stream) too: the core judges it (ConnectionLost)
            items = self._core.receive_data(data)
        except ProtocolError as exc:
            self._dispatch(exc.items)
            self._lost(f"protocol error: {exc}", exc)
            return False
        self._dispatch(items)
        return bool(data)

    async def poll_events(self) -> None:
        """Read whatever QEMU has already sent (events), without waiting. The
        loop reads as data arrives anyway; this catches up with what a busy
        loop has not read yet (bounded, so a flooding peer cannot pin it)."""
        for _ in range(_POLL_BURST):
            if not self._on_readable():
                return

    def _read_to_end(self) -> None:
        """For a peer known to be gone: read at once what it sent before
        leaving (bounded), so a last reply or event (a `quit`'s answer,
        SHUTDOWN) is delivered rather than lost to `close`."""
        for _ in range(_POLL_BURST):
            if not self._on_readable():
                return

    def _dispatch(self, items: list[Item]) -> None:
        if traffic.isEnabledFor(_DEBUG):
            self._log_received(items)
        for item in items:
            if isinstance(item, (Reply, ErrorReply)):
                fut = self._waiters.pop(item.id, None)
                if fut is not None and not fut.done():
                    fut.set_result(item)
            elif isinstance(item, Event):
                self._on_event(item)
            elif isinstance(item, ConnectionLost):
                self._lost(item.reason)
            elif not self._greeting.done():
                self._greeting.set_result(item)

    def _on_event(self, event: Event) -> None:
        self._events.notify(event)
        for i, (name, match, fut) in enumerate(self._event_waiters):
            if not fut.done() and event_matches(event, name, match):
                del self._event_waiters[i]
                fut.set_result(event)
                return
        self._events.push(event)

    # -- events -----------------------------------------------------------

    async def wait_event(
        self,
        name: NameFilter = None,
        match: Mapping[str, Any] | None = None,
        *,
        timeout: TimeoutArg = CLIENT_TIMEOUT,
    ) -> Event:
        """Return (and consume) the oldest event matching `name`/`match`,
        waiting for one if none has arrived yet."""
        deadline = self._deadline(timeout)
        event = self._events.take(name, match)
        if event is not None:
            return event
        what = describe(name, match)
        if self._sock is None:
            raise Disconnected(
                f"QMP connection to {self.name} is closed ({self._closed_reason}); "
                f"no {what} arrived"
            )
        fut: asyncio.Future[Event] = self._loop.create_future()
        waiter = (name, match, fut)
        self._event_waiters.append(waiter)
        try:
            event = await self._wait(fut, deadline, what, False)
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._events.queue.appendleft(fut.result())  # delivered as we were cancelled
            raise
        finally:
            if waiter in self._event_waiters:
                self._event_waiters.remove(waiter)
        return event

    def events(self, *, timeout: TimeoutArg = CLIENT_TIMEOUT) -> _EventIterator:
        """`async for` over events as they arrive (consuming them) until the
        connection closes; each wait is bounded by `timeout` (raises `Timeout`)."""
        return _EventIterator(self, timeout)

    # -- closing ----------------------------------------------------------

    def close(self) -> None:
        """Close at once (no await needed); calls in flight fail with `Disconnected`."""
        self._lost("closed by the client")

    async def aclose(self) -> None:
        self.close()

    def _lost(self, reason: str, error: BaseException | None = None) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._closed_reason = reason
        self._loop.remove_reader(self._fd)
        if self._wbuf:
            self._wbuf.clear()
            self._loop.remove_writer(self._fd)
        sock.close()
        self._core.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

        def gone(what: str) -> QMPError:
            if isinstance(error, ProtocolError):  # what the blocking client raises too
                broken = ProtocolError(str(error))
                broken.data = error.data
                return broken
            exc = Disconnected(f"QMP connection to {self.name} closed ({reason}) {what}")
            exc.__cause__ = error
            return exc

        waiters, self._waiters = self._waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(gone("before the reply came"))
        if not self._greeting.done():
            self._greeting.set_exception(gone("before the greeting"))
        ev_waiters, self._event_waiters = self._event_waiters, []
        for name, match, efut in ev_waiters:
            if not efut.done():
                efut.set_exception(gone(f"while waiting for {describe(name, match)}"))

    async def __aenter__(self) -> AsyncQMPClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Connecting:
    """What `AsyncQMPClient.connect()` returns: awaitable, or an async context manager."""

    def __init__(self, coro: Any) -> None:
        self._coro = coro
        self._client: AsyncQMPClient | None = None

    def __await__(self) -> Generator[Any, None, AsyncQMPClient]:
        return self._coro.__await__()  # type: ignore[no-any-return]

    async def __aenter__(self) -> AsyncQMPClient:
        self._client = await self._coro
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client is not None:
            self._client.close()


class _EventIterator:
    def __init__(self, client: AsyncQMPClient, timeout: TimeoutArg) -> None:
        self._client = client
        self._timeout = timeout

    def __aiter__(self) -> _EventIterator:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self._client.wait_event(timeout=self._timeout)
        except Disconnected:
            raise StopAsyncIteration from None


class _Connector:
    """The asyncio primitives of `connect_plan`."""

    async def resolve(self, host: str, port: int, family: int) -> list[tuple[int, Any]]:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, family=family, type=socket.SOCK_STREAM
        )
        return [(fam, sa) for fam, _, _, _, sa in infos]

    async def connect(self, family: int, sockaddr: Any, deadline: Deadline) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            connecting = asyncio.get_running_loop().sock_connect(sock, sockaddr)
            await asyncio.wait_for(connecting, deadline.remaining())
        except asyncio.TimeoutError:
            sock.close()
            raise Timeout("connecting", deadline.timeout) from None
        except BaseException:
            sock.close()
            raise
        return sock
