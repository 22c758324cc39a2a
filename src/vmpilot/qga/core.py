"""The guest agent's I/O-free core: framing, (re)synchronisation, and the
shapes of requests and results.

The agent has no greeting and answers one request at a time, in order. After
a reconnect, a timeout or a guest reboot, a late answer to an old request may
still come, so the clients (re)synchronise with `guest-sync-delimited`: they
send 0xFF (which resets the agent's parser) and a random token, discard
everything up to the 0xFF the agent puts before its answer, and wait for
their token. Only then is the next answer known to be the next request's.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import AgentError, GuestError

DEFAULT_TIMEOUT = 30.0  # seconds an agent call waits unless told otherwise
CHUNK = 48 * 1024  # file transfer chunk (base64 grows it by a third)
MAX_LINE = 64 * 1024 * 1024
SHUTDOWN_MODES = ("powerdown", "halt", "reboot")

# guest-exec-status must be polled: the agent has no completion event. The
# poll backs off from 5 ms to 100 ms and is bounded by the call's deadline.
POLL_FIRST, POLL_MAX = 0.005, 0.1


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


class AgentState:
    """What a face's reader feeds and the plans read: the protocol and the
    answers received and not consumed yet."""

    def __init__(self) -> None:
        self.proto = AgentProtocol()
        self.pending: deque[dict[str, Any]] = deque()

    def feed(self, data: bytes) -> None:
        self.pending.extend(self.proto.receive_data(data))


def result(command: str, msg: dict[str, Any]) -> Any:
    if "error" in msg:
        err = msg["error"] if isinstance(msg["error"], dict) else {}
        raise AgentError(command, str(err.get("class", "?")), str(err.get("desc", "")))
    return msg.get("return")


def exec_args(
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


def exec_result(status: dict[str, Any]) -> ExecResult:
    return ExecResult(
        status.get("exitcode"),
        status.get("signal"),
        base64.b64decode(status.get("out-data", "")),
        base64.b64decode(status.get("err-data", "")),
    )
