"""Serve any number of QMP clients through one QMP connection.

QEMU's QMP monitor serves one client at a time on a socket, and a Machine
holds its own connection anyway. `QMPServer` listens on a unix socket and
speaks the server side of QMP to every client that connects, relaying their
commands over one upstream client (the Machine's own connection):

- each client gets QEMU's greeting, as received (`oob` offered only when the
  upstream connection enabled it: only then can `exec-oob` be relayed), and
  negotiates capabilities for itself, answered here as QEMU would;
- a relayed command travels with an id of the upstream's own (vmpilot's core
  allocates them) and its reply goes back with the client's id, so two
  clients using the same id never collide;
- every event the upstream receives goes to every negotiated client (events
  and replies travel separate paths: a reply may overtake an event QEMU
  sent just before it);
- a client's in-band commands run one after another, as on QEMU's monitor;
  its `exec-oob` commands go at once;
- a client that disconnects, sends garbage or stops reading affects only
  itself (garbage is answered with an error, as QEMU does; a message over
  the size limit or a client that lets `max_backlog` bytes pile up
  unread is dropped);
- `quit` is relayed like any command: QEMU exits, and the Machine sees it
  exit (see `Machine.serve_qmp`).

File descriptors (SCM_RIGHTS) are not relayed: `getfd`/`add-fd` from a
client fail as they would without an fd.

The server runs its own asyncio loop in one thread whichever face owns the
upstream: `Upstream` adapts a blocking `QMPClient` (a worker pool for the
blocking calls and a reader that keeps events flowing while nobody else
reads) or an `AsyncQMPClient` (its calls run on its own loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, Protocol

from .._util.deadline import Deadline
from ..errors import Disconnected, QMPError, Timeout
from .aio import AsyncQMPClient
from .protocol import Event
from .sync import QMPClient

log = logging.getLogger("vmpilot.qmp")

MAX_MESSAGE = 16 * 1024 * 1024  # a client's message larger than this: dropped
MAX_BACKLOG = 64 * 1024 * 1024  # bytes a client leaves unread before it is dropped
START_TIMEOUT = 10.0  # the server thread's loop coming up
CLOSE_TIMEOUT = 10.0  # joining the server thread
CLOSE_GRACE = 1.0  # closing: for replies on their way, then for clients to take what is buffered
PUMP_SLICE = 0.5  # a blocking upstream's idle reader wakes this often to notice close()
_RECV = 65536
_UCRED = struct.Struct("3i")

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _error(cls: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}


# -- framing: a client's byte stream into JSON values (no I/O) ------------


class Garbage:
    """Bytes that are not a JSON value (answered with an error, as QEMU does)."""

    __slots__ = ("text",)

    def __init__(self, text: bytes) -> None:
        self.text = text


class TooLong(QMPError):
    """A client's message grew past `MAX_MESSAGE` (the client is dropped)."""


class Splitter:
    """Split a stream into JSON objects/arrays by bracket depth, as QEMU's
    own JSON streamer does: clients need not end messages with a newline,
    and a message may span lines. Anything else at the top level is garbage,
    reported once per run of non-blank bytes."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._depth = 0
        self._in_str = False
        self._esc = False
        self._junk = False  # in a run of garbage already reported
        self._junk_text = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        """The complete values (or `Garbage`) in `data` and what came before."""
        out: list[Any] = []
        buf, junk = self._buf, self._junk_text
        for byte in data:
            if self._depth == 0:
                if byte in b"{[ \t\r\n":
                    self._junk = False
                    if junk:
                        out.append(Garbage(bytes(junk)))
                        junk.clear()
                    if byte in b"{[":
                        self._depth = 1
                        buf.append(byte)
                elif not self._junk:
                    if len(junk) < 60:
                        junk.append(byte)
                    if len(junk) == 60:
                        self._junk = True  # the rest of this run is not reported again
                continue
            buf.append(byte)
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif byte == 0x5C:  # backslash
                    self._esc = True
                elif byte == 0x22:  # quote
                    self._in_str = False
            elif byte == 0x22:
                self._in_str = True
            elif byte in b"{[":
                self._depth += 1
            elif byte in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    out.append(_decode(bytes(buf)))
                    buf.clear()
            if len(buf) > self.max_message:
                raise TooLong(f"message longer than {self.max_message} bytes")
        if junk:  # report it now; its continuation, if any, is not reported again
            out.append(Garbage(bytes(junk)))
            junk.clear()
            self._junk = True
        return out


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _decode(text: bytes) -> Any:
    try:  # NaN and Infinity are Python's extensions, not JSON: QEMU rejects them too
        return json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError):
        return Garbage(text)


# -- one client's side of the protocol (no I/O) ---------------------------


class Relay:
    """A command to send upstream: the message as QEMU gets it (no id) and
    the client's id to put back on the reply."""

    __slots__ = ("has_id", "id", "message", "name", "oob")

    def __init__(self, message: dict[str, Any], name: str, oob: bool, has_id: bool, id_: Any):
        self.message = message
        self.name = name
        self.oob = oob
        self.has_id = has_id
        self.id = id_

    def reply(self, response: dict[str, Any]) -> dict[str, Any]:
        return dict(response, id=self.id) if self.has_id else response


_MEMBERS = frozenset({"execute", "exec-oob", "arguments", "id"})


class Session:
    """One client's negotiation state and QEMU's rules for its input:
    `handle(value)` returns the answer to send back at once, or a `Relay`."""

    def __init__(self, capabilities: list[str]) -> None:
        self.capabilities = capabilities
        self.negotiated = False
        self.oob = False

    def handle(self, msg: Any) -> dict[str, Any] | Relay:
        if not isinstance(msg, dict):
            return _error("GenericError", "QMP input must be a JSON object")
        has_id = "id" in msg
        id_ = msg.get("id")

        def answer(response: dict[str, Any]) -> dict[str, Any]:
            return dict(response, id=id_) if has_id else response

        for key in msg:
            if key not in _MEMBERS:
                return answer(_error("GenericError", f"QMP input member '{key}' is unexpected"))
        oob = "exec-oob" in msg
        if oob and "execute" in msg:
            return answer(_error("GenericError", "QMP input has both 'execute' and 'exec-oob'"))
        name = msg.get("exec-oob" if oob else "execute")
        if name is None:
            return answer(_error("GenericError", "QMP input lacks member 'execute'"))
        if not isinstance(name, str):
            member = "exec-oob" if oob else "execute"
            return answer(_error("GenericError", f"QMP input member '{member}' must be a string"))
        arguments = msg.get("arguments")
        if arguments is not None and not isinstance(arguments, dict):
            return answer(_error("GenericError", "QMP input member 'arguments' must be an object"))
        if not self.negotiated:
            if name != "qmp_capabilities":
                return answer(
                    _error(
                        "CommandNotFound",
                        "Expecting capabilities negotiation with 'qmp_capabilities'",
                    )
                )
            return answer(self._negotiate(arguments or {}))
        if name == "qmp_capabilities":
            return answer(
                _error(
                    "CommandNotFound",
                    "Capabilities negotiation is already complete, command ignored",
                )
            )
        if oob and not self.oob:
            return answer(
                _error(
                    "GenericError",
                    "Please enable out-of-band first for the session during "
                    "capabilities negotiation",
                )
            )
        out: dict[str, Any] = {"exec-oob" if oob else "execute": name}
        if arguments is not None:
            out["arguments"] = arguments
        return Relay(out, name, oob, has_id, id_)

    def _negotiate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        extra = [k for k in arguments if k != "enable"]
        if extra:
            return _error("GenericError", f"Parameter '{extra[0]}' is unexpected")
        enable = arguments.get("enable", [])
        if not isinstance(enable, list) or not all(isinstance(c, str) for c in enable):
            return _error("GenericError", "Invalid parameter type for 'enable', expected: array")
        for cap in enable:
            if cap not in self.capabilities:
                return _error("GenericError", f"Capability '{cap}' not available")
        self.negotiated = True
        self.oob = "oob" in enable
        return {"return": {}}


def event_message(event: Event) -> dict[str, Any]:
    """An event as QEMU sent it (`data` left out when empty, as QEMU does)."""
    msg: dict[str, Any] = {"event": event.name}
    if event.data:
        msg["data"] = event.data
    msg["timestamp"] = {"seconds": event.seconds, "microseconds": event.microseconds}
    return msg


# -- the upstream connection ----------------------------------------------


class Upstream(Protocol):
    """What the server needs of the connection it relays through."""

    name: str
    greeting: dict[str, Any]
    oob: bool

    def forward(self, message: dict[str, Any]) -> concurrent.futures.Future[dict[str, Any]]:
        """Send `message`, from any thread; the future holds QEMU's response."""

    def subscribe(self, callback: Callable[[Event], object]) -> None:
        """Call `callback(event)` for each event, from any thread."""

    def close(self) -> None:
        """Stop (the connection itself stays open: it is not the server's)."""


def _greeting(client: QMPClient | AsyncQMPClient) -> tuple[dict[str, Any], bool]:
    greeting = client.greeting
    if greeting is None or client.closed:
        raise Disconnected(f"QMP connection to {client.name} is not ready to relay")
    return greeting.raw, client._core.oob_enabled


class SyncUpstream:
    """A blocking `QMPClient` as the upstream: its calls run in a small pool,
    and a reader thread keeps events flowing while no other call reads."""

    def __init__(self, client: QMPClient, workers: int = 8) -> None:
        self.client = client
        self.name = client.name
        self.greeting, self.oob = _greeting(client)
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, f"vmpilot-relay-{id(self)}")
        self._stop = threading.Event()
        self._listener: object | None = None
        self._pump = threading.Thread(target=self._read_events, daemon=True, name="vmpilot-pump")
        self._pump.start()

    def forward(self, message: dict[str, Any]) -> concurrent.futures.Future[dict[str, Any]]:
        # no timeout: a client's command may take as long as QEMU takes; a
        # timeout would break the shared connection (a reply left unread)
        return self._pool.submit(self.client.execute_message, message, timeout=None)

    def subscribe(self, callback: Callable[[Event], object]) -> None:
        self._listener = self.client.add_listener(callback)

    def _read_events(self) -> None:
        """Be the client's reader whenever no call is (see `QMPClient`): the
        events it reads reach the listeners at once."""
        stop = self._stop
        while not stop.is_set():
            try:
                self.client._await(
                    lambda: True if stop.is_set() else None,
                    Deadline(PUMP_SLICE),
                    lambda: "events to relay",
                    False,
                )
            except Timeout:
                continue
            except QMPError:
                return  # the connection is gone

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(ValueError):
                self.client.remove_listener(self._listener)
            self._listener = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._pump is not threading.current_thread():
            self._pump.join(PUMP_SLICE * 4)


class AsyncUpstream:
    """An `AsyncQMPClient` as the upstream: its calls run on its own loop."""

    def __init__(self, client: AsyncQMPClient) -> None:
        self.client = client
        self.name = client.name
        self.greeting, self.oob = _greeting(client)
        self._loop = client._loop
        self._listener: object | None = None

    def forward(self, message: dict[str, Any]) -> concurrent.futures.Future[dict[str, Any]]:
        return asyncio.run_coroutine_threadsafe(
            self.client.execute_message(message, timeout=None), self._loop
        )

    def subscribe(self, callback: Callable[[Event], object]) -> None:
        self._listener = self.client.add_listener(callback)

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self.client.remove_listener(listener)

        if self._loop.is_closed():
            remove()
        else:
            self._loop.call_soon_threadsafe(remove)


def serve(
    client: QMPClient | AsyncQMPClient,
    path: str | os.PathLike[str],
    *,
    max_backlog: int = MAX_BACKLOG,
) -> QMPServer:
    """Serve QMP on a new unix socket at `path` through `client`'s connection."""
    if isinstance(client, QMPClient):
        return QMPServer(SyncUpstream(client), path, max_backlog=max_backlog)
    return QMPServer(AsyncUpstream(client), path, max_backlog=max_backlog)


# -- the server -------------------------------------------------------------


def _peer_pid(sock: Any) -> str:
    with contextlib.suppress(OSError, AttributeError, struct.error):
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        return f"pid {_UCRED.unpack(raw)[0]}"
    return "pid ?"


class _Client:
    def __init__(
        self, name: str, writer: asyncio.StreamWriter, caps: list[str], max_backlog: int
    ) -> None:
        self.name = name
        self.max_backlog = max_backlog
        self.writer = writer
        self.session = Session(caps)
        self.oob_tasks: set[asyncio.Task[None]] = set()

    def send(self, msg: dict[str, Any]) -> None:
        if self.writer.is_closing():
            return
        if self.writer.transport.get_write_buffer_size() > self.max_backlog:
            log.warning("%s: dropped (left over %d bytes unread)", self.name, self.max_backlog)
            self.writer.transport.abort()
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s <- %s", self.name, _dumps(msg))
        self.writer.write(_dumps(msg).encode() + b"\r\n")


class QMPServer:
    """A unix socket serving QMP to any number of clients through `upstream`.

    Created listening; `close()` (idempotent, any thread) stops it, drops
    its clients and removes the socket file. `path` is where clients connect."""

    def __init__(
        self, upstream: Upstream, path: str | os.PathLike[str], *, max_backlog: int = MAX_BACKLOG
    ) -> None:
        self.path = os.fspath(path)
        self.max_backlog = max_backlog
        self._upstream = upstream
        try:
            self._start()
        except BaseException:
            upstream.close()
            raise
        log.info("serving QMP of %s on %s", upstream.name, self.path)

    def _start(self) -> None:
        upstream = self._upstream
        caps = list(upstream.greeting.get("QMP", {}).get("capabilities", []))
        self._caps = caps if upstream.oob else [c for c in caps if c != "oob"]
        greeting = json.loads(json.dumps(upstream.greeting))
        greeting["QMP"]["capabilities"] = self._caps
        self._greeting = greeting
        self._clients: set[_Client] = set()
        self._inflight: set[asyncio.Future[dict[str, Any]]] = set()
        self._count = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(self.path)  # an existing file is an error, never removed
            os.chmod(self.path, 0o600)
            self._listener.listen(16)
        except BaseException:
            self._listener.close()
            raise
        self._loop = asyncio.new_event_loop()
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="vmpilot-qmp-server")
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            self.close()
            raise Timeout("the QMP server's thread to start", START_TIMEOUT)
        upstream.subscribe(self._on_event)

    @property
    def clients(self) -> int:
        """How many clients are connected now."""
        return len(self._clients)

    def close(self) -> None:
        """Stop serving: every client is disconnected, the socket file removed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._upstream.close()
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already closed
                self._loop.call_soon_threadsafe(self._stop)
            if self._thread is not threading.current_thread():
                self._thread.join(CLOSE_TIMEOUT)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        log.info("stopped serving QMP on %s", self.path)

    def __enter__(self) -> QMPServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<QMPServer {self.path} clients={self.clients}{' closed' if self._closed else ''}>"

    # -- in the server's thread --------------------------------------------

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        finally:
            with contextlib.suppress(RuntimeError):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        server = await asyncio.start_unix_server(self._serve, sock=self._listener)
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            server.close()
            if self._inflight:  # replies on their way (the answer to a `quit`, say)
                await asyncio.wait(self._inflight, timeout=CLOSE_GRACE)
            for client in list(self._clients):
                client.writer.close()  # after what is buffered; their handlers then return
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if tasks:
                _, late = await asyncio.wait(tasks, timeout=CLOSE_GRACE)
                for task in late:  # a client not reading, or a reply QEMU still owes
                    task.cancel()
                for client in list(self._clients):
                    client.writer.transport.abort()
                if late:
                    await asyncio.wait(late)

    def _stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    def _on_event(self, event: Event) -> None:
        """The upstream's listener (any thread): hand the event to the loop."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            self._loop.call_soon_threadsafe(self._broadcast, event)

    def _broadcast(self, event: Event) -> None:
        msg = event_message(event)
        for client in list(self._clients):
            if client.session.negotiated:
                client.send(msg)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name = (
            f"{self.path} client {next(self._count)} ({_peer_pid(writer.get_extra_info('socket'))})"
        )
        client = _Client(name, writer, self._caps, self.max_backlog)
        self._clients.add(client)
        log.info("%s: connected", name)
        why = "disconnected"
        try:
            client.send(self._greeting)
            splitter = Splitter()
            while not writer.is_closing():
                data = await reader.read(_RECV)
                if not data:
                    break
                try:
                    values = splitter.feed(data)
                except TooLong as exc:
                    client.send(_error("GenericError", f"JSON parse error, {exc}"))
                    why = f"dropped: {exc}"
                    break
                for value in values:
                    await self._handle(client, value)
        except ConnectionError:
            why = "disconnected"  # with data of ours unread
        except OSError as exc:
            why = f"dropped: {exc}"
        except asyncio.CancelledError:
            why = "dropped: the server is closing"  # ends here (asyncio's streams log a re-raise)
        finally:
            self._clients.discard(client)
            for task in client.oob_tasks:
                task.cancel()
            writer.close()
            log.info("%s: %s", name, why)

    async def _handle(self, client: _Client, value: Any) -> None:
        if isinstance(value, Garbage):
            text = value.text.decode(errors="replace")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s -> garbage %r", client.name, text)
            client.send(_error("GenericError", f"JSON parse error, invalid input {text!r}"))
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s -> %s", client.name, _dumps(value))
        outcome = client.session.handle(value)
        if isinstance(outcome, dict):
            client.send(outcome)
        elif outcome.oob:
            task = asyncio.ensure_future(self._relay(client, outcome))
            client.oob_tasks.add(task)
            task.add_done_callback(client.oob_tasks.discard)
        else:
            await self._relay(client, outcome)

    async def _relay(self, client: _Client, relay: Relay) -> None:
        if relay.name == "quit":
            log.info("%s: sent 'quit': QEMU will exit", client.name)
        try:
            future = asyncio.wrap_future(self._upstream.forward(relay.message))
            self._inflight.add(future)
            try:
                response = await future
            finally:
                self._inflight.discard(future)
        except (QMPError, RuntimeError) as exc:
            # the upstream connection is gone (so is QEMU's monitor), or it
            # stopped taking commands (RuntimeError: the server is closing)
            client.send(relay.reply(_error("GenericError", f"vmpilot: {exc}")))
            client.writer.close()
            return
        except (TypeError, ValueError) as exc:  # a message the upstream would not encode
            client.send(relay.reply(_error("GenericError", f"vmpilot: {exc}")))
            return
        client.send(relay.reply(response))
