"""The QMP primitives of the job, migration and snapshot plans, for both faces.

Those plans talk to one QEMU or two (a migration), so each primitive takes
the QMP client it acts on: `SyncOps` runs them on a blocking `QMPClient`,
`AsyncOps` on an `AsyncQMPClient`. The plans stay free of I/O; the faces
(`Machine`, `AsyncMachine`, the CLI) only choose the runner.

- `qmp(client, command, arguments, deadline)`: one command, its `return`;
- `event(client, names, match, deadline)`: the next matching event, or
  None once the deadline passes (a plan's own poll interval, not an error);
- `send_fd(client, fd, name, deadline)`: SCM_RIGHTS + `getfd`;
- `socketpair()` / `close_fds(fds)`: the migration channel's two ends;
- `report(callback, *values)`: call a progress callback (a plain function).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._util.deadline import Deadline
from ..errors import Timeout
from ..qmp import AsyncQMPClient, Event, QMPClient
from ..qmp.events import NameFilter


def _pair() -> tuple[int, int]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return a.detach(), b.detach()


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


class SyncOps:
    """Blocking primitives (see the module docstring)."""

    def qmp(
        self, client: QMPClient, command: str, arguments: Mapping[str, Any] | None, d: Deadline
    ) -> Any:
        return client.execute(command, arguments, timeout=d.remaining())

    def event(
        self, client: QMPClient, names: NameFilter, match: Mapping[str, Any] | None, d: Deadline
    ) -> Event | None:
        try:
            return client.wait_event(names, match, timeout=d.remaining())
        except Timeout:
            return None

    def send_fd(self, client: QMPClient, fd: int, name: str, d: Deadline) -> None:
        client.send_fd(fd, name, timeout=d.remaining())

    def socketpair(self) -> tuple[int, int]:
        return _pair()

    def close_fds(self, fds: Sequence[int]) -> None:
        _close(fds)

    def report(self, callback: Callable[..., object], *values: Any) -> None:
        callback(*values)


class AsyncOps:
    """asyncio primitives (see the module docstring)."""

    async def qmp(
        self,
        client: AsyncQMPClient,
        command: str,
        arguments: Mapping[str, Any] | None,
        d: Deadline,
    ) -> Any:
        return await client.execute(command, arguments, timeout=d.remaining())

    async def event(
        self,
        client: AsyncQMPClient,
        names: NameFilter,
        match: Mapping[str, Any] | None,
        d: Deadline,
    ) -> Event | None:
        try:
            return await client.wait_event(names, match, timeout=d.remaining())
        except Timeout:
            return None

    async def send_fd(self, client: AsyncQMPClient, fd: int, name: str, d: Deadline) -> None:
        await client.send_fd(fd, name, timeout=d.remaining())

    async def socketpair(self) -> tuple[int, int]:
        return _pair()

    async def close_fds(self, fds: Sequence[int]) -> None:
        _close(fds)

    async def report(self, callback: Callable[..., object], *values: Any) -> None:
        callback(*values)
