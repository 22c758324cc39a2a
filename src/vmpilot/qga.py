"""The QEMU guest agent (qemu-ga): a sans-I/O core and blocking/asyncio clients.

The agent has no greeting and answers one request at a time, in order. After
a reconnect, a timeout or a guest reboot, a late answer to an old request may
still come, so the clients (re)synchronise with `guest-sync-delimited`: they
send 0xFF (which resets the agent's parser) and a random token, discard
everything up to the 0xFF the agent puts before its answer, and wait for
their token. Only then is the next answer known to be the next request's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ._util.deadline import Deadline
from .errors import GuestError, Timeout

DEFAULT_TIMEOUT = 30.0
CHUNK = 48 * 1024  # file transfer chunk (base64 grows it by a third)
MAX_LINE = 64 * 1024 * 1024


class AgentError(GuestError):
    """The agent answered with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"guest agent: {command} failed: {error_class}: {desc}")


class AgentTimeout(Timeout, GuestError):
    """The agent did not answer in time (not running yet, or busy)."""


class AgentGone(GuestError):
    """The agent's channel closed (QEMU exited, or it was closed)."""


class ExecResult:
    """What `exec()` returns: exit code (or signal) and the captured output."""

    __slots__ = ("exit_code", "signal", "stderr", "stdout")

    def __init__(self, exit_code: int | None, signal: int | None, stdout: bytes, stderr: bytes):
        self.exit_code = exit_code
        self.signal = signal
        self.stdout = stdout
        self.stderr = stderr

    def __repr__(self) -> str:
        return (
            f"ExecResult(exit_code={self.exit_code}, signal={self.signal}, "
            f"stdout={self.stdout[:80]!r}, stderr={self.stderr[:80]!r})"
        )


class AgentProtocol:
    """Framing and synchronisation state, no I/O."""

    def __init__(self) -> None:
        self.synced = False
        self._token = 0
        self._discarding = False  # until the 0xFF that precedes the sync answer
        self._buf = bytearray()

    def sync_request(self) -> bytes:
        self._token = secrets.randbelow(2**31 - 1) + 1
        self._discarding = True
        self.synced = False
        msg = {"execute": "guest-sync-delimited", "arguments": {"id": self._token}}
        return b"\xff" + json.dumps(msg).encode() + b"\n"

    @staticmethod
    def request(name: str, arguments: Mapping[str, Any] | None) -> bytes:
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = dict(arguments)
        return json.dumps(msg).encode() + b"\n"

    def receive_data(self, data: bytes) -> list[dict[str, Any]]:
        """Complete messages in `data`; while resynchronising, only the
        answer carrying our token counts (it sets `synced`)."""
        if self._discarding:
            mark = data.rfind(b"\xff")
            if mark < 0:
                return []
            data = data[mark + 1 :]
            self._buf.clear()
            self._discarding = False
        self._buf += data.replace(b"\xff", b"")
        if len(self._buf) > MAX_LINE:
            raise GuestError("guest agent sent an over-long message")
        out: list[dict[str, Any]] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                return out
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                raise GuestError(f"guest agent sent invalid JSON: {line[:200]!r}") from None
            if not isinstance(msg, dict):
                raise GuestError(f"guest agent sent a non-object: {line[:200]!r}")
            if not self.synced:
                if msg.get("return") == self._token:
                    self.synced = True
                continue  # a stale answer to an older request
            out.append(msg)


def _result(command: str, msg: dict[str, Any]) -> Any:
    if "error" in msg:
        err = msg["error"] if isinstance(msg["error"], dict) else {}
        raise AgentError(command, str(err.get("class", "?")), str(err.get("desc", "")))
    return msg.get("return")


def _exec_args(
    argv: Sequence[str], input: bytes | None, env: Mapping[str, str] | None
) -> dict[str, Any]:
    if isinstance(argv, str) or not argv:
        raise ValueError("exec() takes a non-empty argv list, e.g. ['/bin/sh', '-c', 'uname -r']")
    args: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
    if input is not None:
        args["input-data"] = base64.b64encode(input).decode()
    if env is not None:
        args["env"] = [f"{k}={v}" for k, v in env.items()]
    return args


def _exec_result(status: dict[str, Any]) -> ExecResult:
    return ExecResult(
        status.get("exitcode"),
        status.get("signal"),
        base64.b64decode(status.get("out-data", "")),
        base64.b64decode(status.get("err-data", "")),
    )


# guest-exec-status must be polled: the agent has no completion event. The
# poll backs off from 5 ms to 100 ms and is bounded by the call's deadline.
_POLL_FIRST, _POLL_MAX = 0.005, 0.1


class GuestAgent:
    """Blocking guest agent client over a connected socket (thread-safe)."""

    def __init__(self, sock: socket.socket, name: str = "guest agent") -> None:
        self._sock: socket.socket | None = sock
        sock.setblocking(True)
        self.name = name
        self._proto = AgentProtocol()
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.RLock()

    # -- core -------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        sock = self._check()
        try:
            sock.sendall(data)
        except OSError as exc:
            raise AgentGone(f"{self.name}: cannot send: {exc}") from exc

    def _check(self) -> socket.socket:
        if self._sock is None:
            raise AgentGone(f"{self.name}: the channel is closed")
        return self._sock

    def _next(self, deadline: Deadline, what: str) -> dict[str, Any] | None:
        """The next message, or None once `synced` flips (during a sync)."""
        sock = self._check()
        while not self._pending:
            sock.settimeout(deadline.remaining())
            try:
                data = sock.recv(65536)
            except (TimeoutError, BlockingIOError):  # BlockingIOError: no time was left
                self._proto.synced = False  # a late answer may still come: resync next time
                raise AgentTimeout(what, deadline.timeout) from None
            except OSError as exc:
                raise AgentGone(f"{self.name}: {exc}") from exc
            if not data:
                self.close()
                raise AgentGone(f"{self.name}: the channel closed while waiting for {what}")
            was_synced = self._proto.synced
            self._pending += self._proto.receive_data(data)
            if not was_synced and self._proto.synced and not self._pending:
                return None
        return self._pending.pop(0)

    def sync(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """(Re)synchronise; also the way to wait for the agent to come up."""
        with self._lock:
            deadline = Deadline(timeout)
            self._pending.clear()
            self._send(self._proto.sync_request())
            while not self._proto.synced:
                self._next(deadline, "the guest agent (guest-sync-delimited)")

    def execute(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> Any:
        """Run agent command `name`; its `return` value, or `AgentError`."""
        with self._lock:
            deadline = Deadline(timeout)
            if not self._proto.synced:
                self.sync(deadline.remaining())
            self._send(self._proto.request(name, arguments))
            msg = self._next(deadline, f"the agent's answer to {name!r}")
            assert msg is not None
            return _result(name, msg)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # -- commands ---------------------------------------------------------

    def ping(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.execute("guest-ping", timeout=timeout)

    def info(self) -> dict[str, Any]:
        result: dict[str, Any] = self.execute("guest-info")
        return result

    def exec(
        self,
        argv: Sequence[str],
        input: bytes | None = None,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> ExecResult:
        """Run `argv` in the guest; wait (bounded) for it; exit code and output."""
        deadline = Deadline(timeout)
        pid = self.execute("guest-exec", _exec_args(argv, input, env), timeout=timeout)["pid"]
        what = f"{list(argv)!r} (pid {pid}) to finish in the guest"
        delay = _POLL_FIRST
        while True:
            try:
                status = self.execute(
                    "guest-exec-status", {"pid": pid}, timeout=deadline.remaining()
                )
            except AgentTimeout as exc:
                raise AgentTimeout(what, timeout) from exc
            if status.get("exited"):
                return _exec_result(status)
            remaining = deadline.remaining()
            if remaining == 0:
                raise AgentTimeout(what, timeout)
            time.sleep(min(delay, remaining if remaining is not None else delay))
            delay = min(delay * 2, _POLL_MAX)

    def read_file(self, path: str, timeout: float | None = DEFAULT_TIMEOUT) -> bytes:
        deadline = Deadline(timeout)
        handle = self.execute("guest-file-open", {"path": path, "mode": "r"}, timeout=timeout)
        data = bytearray()
        try:
            while True:
                chunk = self.execute(
                    "guest-file-read", {"handle": handle, "count": CHUNK},
                    timeout=deadline.remaining(),
                )  # fmt: skip
                data += base64.b64decode(chunk.get("buf-b64", ""))
                if chunk.get("eof") or not chunk.get("count"):
                    return bytes(data)
        finally:
            self.execute("guest-file-close", {"handle": handle}, timeout=deadline.remaining())

    def write_file(self, path: str, data: bytes, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        deadline = Deadline(timeout)
        handle = self.execute("guest-file-open", {"path": path, "mode": "w"}, timeout=timeout)
        try:
            for i in range(0, len(data), CHUNK):
                piece = base64.b64encode(data[i : i + CHUNK]).decode()
                self.execute(
                    "guest-file-write", {"handle": handle, "buf-b64": piece},
                    timeout=deadline.remaining(),
                )  # fmt: skip
            self.execute("guest-file-flush", {"handle": handle}, timeout=deadline.remaining())
        finally:
            self.execute("guest-file-close", {"handle": handle}, timeout=deadline.remaining())

    def shutdown(self, mode: str = "powerdown") -> None:
        """Ask the guest to power down/halt/reboot. The agent sends no answer
        on success: wait for the VM (`vm.wait()`) to see it happen."""
        if mode not in ("powerdown", "halt", "reboot"):
            raise ValueError(f"mode must be powerdown, halt or reboot, not {mode!r}")
        with self._lock:
            if not self._proto.synced:
                self.sync()
            self._send(self._proto.request("guest-shutdown", {"mode": mode}))
            self._proto.synced = False  # no answer will come: the next call resyncs

    def fsfreeze_status(self) -> str:
        status: str = self.execute("guest-fsfreeze-status")
        return status

    def network_interfaces(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.execute("guest-network-get-interfaces")
        return result


class AsyncGuestAgent:
    """The guest agent for asyncio code; read by a loop callback."""

    def __init__(self, sock: socket.socket, name: str = "guest agent") -> None:
        self._sock: socket.socket | None = sock
        sock.setblocking(False)
        self.name = name
        self._proto = AgentProtocol()
        self._loop = asyncio.get_running_loop()
        self._messages: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        self._synced = asyncio.Event()
        self._lock = asyncio.Lock()
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._gone(f"{exc}")
            return
        if not data:
            self._gone("the channel closed")
            return
        was = self._proto.synced
        try:
            msgs = self._proto.receive_data(data)
        except GuestError as exc:
            self._messages.put_nowait(exc)
            return
        if self._proto.synced and not was:
            self._synced.set()
        for m in msgs:
            self._messages.put_nowait(m)

    def _gone(self, why: str) -> None:
        self.close()
        self._messages.put_nowait(AgentGone(f"{self.name}: {why}"))
        self._synced.set()

    async def _wait(self, aw: Any, deadline: Deadline, what: str) -> Any:
        try:
            return await asyncio.wait_for(aw, deadline.remaining())
        except asyncio.TimeoutError:
            self._proto.synced = False
            raise AgentTimeout(what, deadline.timeout) from None

    async def sync(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        async with self._lock:
            await self._sync(Deadline(timeout))

    async def _sync(self, deadline: Deadline) -> None:
        self._send(self._proto.sync_request())
        self._synced.clear()
        while not self._messages.empty():
            self._messages.get_nowait()
        await self._wait(self._synced.wait(), deadline, "the guest agent (guest-sync-delimited)")
        if self._sock is None:
            raise AgentGone(f"{self.name}: the channel is closed")

    def _send(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            raise AgentGone(f"{self.name}: the channel is closed")
        try:
            sent = sock.send(data)
        except OSError as exc:
            raise AgentGone(f"{self.name}: cannot send: {exc}") from exc
        if sent < len(data):
            raise GuestError(f"{self.name}: the channel is not accepting data")

    async def execute(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> Any:
        async with self._lock:
            deadline = Deadline(timeout)
            if not self._proto.synced:
                await self._sync(deadline)
            self._send(self._proto.request(name, arguments))
            msg = await self._wait(self._messages.get(), deadline, f"the answer to {name!r}")
            if isinstance(msg, BaseException):
                raise msg
            return _result(name, msg)

    async def ping(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        await self.execute("guest-ping", timeout=timeout)

    async def exec(
        self,
        argv: Sequence[str],
        input: bytes | None = None,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> ExecResult:
        deadline = Deadline(timeout)
        started = await self.execute("guest-exec", _exec_args(argv, input, env), timeout=timeout)
        what = f"{list(argv)!r} (pid {started['pid']}) to finish in the guest"
        delay = _POLL_FIRST
        while True:
            try:
                status = await self.execute(
                    "guest-exec-status", {"pid": started["pid"]}, timeout=deadline.remaining()
                )
            except AgentTimeout as exc:
                raise AgentTimeout(what, timeout) from exc
            if status.get("exited"):
                return _exec_result(status)
            remaining = deadline.remaining()
            if remaining == 0:
                raise AgentTimeout(what, timeout)
            await asyncio.sleep(min(delay, remaining if remaining is not None else delay))
            delay = min(delay * 2, _POLL_MAX)

    async def shutdown(self, mode: str = "powerdown") -> None:
        if mode not in ("powerdown", "halt", "reboot"):
            raise ValueError(f"mode must be powerdown, halt or reboot, not {mode!r}")
        async with self._lock:
            if not self._proto.synced:
                await self._sync(Deadline(DEFAULT_TIMEOUT))
            self._send(self._proto.request("guest-shutdown", {"mode": mode}))
            self._proto.synced = False

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            self._loop.remove_reader(self._fd)
            sock.close()
