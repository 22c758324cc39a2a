"""The guest agent for asyncio code: a loop reader feeds the protocol."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from .._util.deadline import Deadline, Within
from .._util.plan import Plan, arun
from ..errors import AgentGone, GuestError
from . import plans
from .core import DEFAULT_TIMEOUT, AgentState, ExecResult

T = TypeVar("T")


class AsyncGuestAgent:
    """The guest agent for asyncio code; read by a loop callback."""

    def __init__(self, sock: socket.socket, name: str = "guest agent") -> None:
        self._sock: socket.socket | None = sock
        sock.setblocking(False)
        self.name = name
        self._state = AgentState()
        self._loop = asyncio.get_running_loop()
        self._input = asyncio.Event()
        self._error: GuestError | None = None  # what the reader hit, for the next wait
        self._lock = asyncio.Lock()
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._on_readable)

    # -- operations (written once, in `plans`) ------------------------------

    async def sync(self, *, timeout: Within = DEFAULT_TIMEOUT) -> None:
        """See `GuestAgent.sync`."""
        await self._exclusive(plans.sync(self._state, Deadline.of(timeout)))

    async def execute(
        self, name: str, arguments: Mapping[str, Any] | None = None, *,
        timeout: Within = DEFAULT_TIMEOUT,
    ) -> Any:  # fmt: skip
        """See `GuestAgent.execute`."""
        return await self._execute(name, arguments, Deadline.of(timeout))

    async def ping(self, *, timeout: Within = DEFAULT_TIMEOUT) -> None:
        await arun(plans.command("guest-ping", None, Deadline.of(timeout)), self)

    async def info(self, *, timeout: Within = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """See `GuestAgent.info`."""
        plan = plans.command("guest-info", None, Deadline.of(timeout))
        info: dict[str, Any] = await arun(plan, self)
        return info

    async def exec(
        self, argv: Sequence[str], input: bytes | None = None, *,
        env: Mapping[str, str] | None = None, timeout: Within = DEFAULT_TIMEOUT,
    ) -> ExecResult:  # fmt: skip
        """See `GuestAgent.exec`."""
        return await arun(plans.exec_(argv, input, env, Deadline.of(timeout)), self)

    async def read_file(self, path: str, *, timeout: Within = DEFAULT_TIMEOUT) -> bytes:
        """See `GuestAgent.read_file`."""
        return await arun(plans.read_file(path, Deadline.of(timeout)), self)

    async def write_file(
        self, path: str, data: bytes, *, timeout: Within = DEFAULT_TIMEOUT
    ) -> None:
        """See `GuestAgent.write_file`."""
        await arun(plans.write_file(path, data, Deadline.of(timeout)), self)

    async def shutdown(self, mode: str = "powerdown", *, timeout: Within = DEFAULT_TIMEOUT) -> None:
        """See `GuestAgent.shutdown`."""
        await self._exclusive(plans.shutdown(self._state, mode, Deadline.of(timeout)))

    async def fsfreeze_status(self, *, timeout: Within = DEFAULT_TIMEOUT) -> str:
        """See `GuestAgent.fsfreeze_status`."""
        plan = plans.command("guest-fsfreeze-status", None, Deadline.of(timeout))
        status: str = await arun(plan, self)
        return status

    async def network_interfaces(
        self, *, timeout: Within = DEFAULT_TIMEOUT
    ) -> list[dict[str, Any]]:
        """See `GuestAgent.network_interfaces`."""
        plan = plans.command("guest-network-get-interfaces", None, Deadline.of(timeout))
        result: list[dict[str, Any]] = await arun(plan, self)
        return result

    def close(self) -> None:
        """Close the channel; later calls raise `AgentGone`. Idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            self._loop.remove_reader(self._fd)
            sock.close()
        self._input.set()  # a waiting call sees it at once

    # -- primitives the plans call ------------------------------------------

    async def _exclusive(self, plan: Plan[T]) -> T:
        async with self._lock:
            return await arun(plan, self)

    async def _execute(
        self, name: str, arguments: Mapping[str, Any] | None, deadline: Deadline
    ) -> Any:
        return await self._exclusive(plans.execute(self._state, name, arguments, deadline))

    def _open_socket(self) -> socket.socket:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._sock is None:
            raise AgentGone(f"{self.name}: the channel is closed")
        return self._sock

    async def _send(self, data: bytes, deadline: Deadline) -> bool:
        sock = self._open_socket()
        try:
            await asyncio.wait_for(self._loop.sock_sendall(sock, data), deadline.remaining())
        except asyncio.TimeoutError:
            return False
        except OSError as exc:
            raise AgentGone(f"{self.name}: cannot send: {exc}") from exc
        return True

    async def _wait_input(self, deadline: Deadline) -> bool:
        self._open_socket()
        self._input.clear()
        try:
            await asyncio.wait_for(self._input.wait(), deadline.remaining())
        except asyncio.TimeoutError:
            return False
        self._open_socket()  # raises what the reader met
        return True

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)  # the agent has no completion event: exec polls

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._error = AgentGone(f"{self.name}: {exc}")
            self.close()
            return
        if not data:
            self._error = AgentGone(f"{self.name}: the channel closed (QEMU exited?)")
            self.close()
            return
        try:
            self._state.feed(data)
        except GuestError as exc:
            self._error = exc
        self._input.set()
