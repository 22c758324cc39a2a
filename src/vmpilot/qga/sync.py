"""The guest agent for blocking code: the caller's thread reads the socket."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from .._util.deadline import Deadline, Within
from .._util.plan import Plan, run
from ..errors import AgentGone
from . import plans
from .core import DEFAULT_TIMEOUT, AgentState, ExecResult

T = TypeVar("T")


class GuestAgent:
    """Blocking guest agent client over a connected socket (thread-safe)."""

    def __init__(self, sock: socket.socket, name: str = "guest agent") -> None:
        self._sock: socket.socket | None = sock
        sock.setblocking(True)
        self.name = name
        self._state = AgentState()
        self._lock = threading.RLock()

    # -- operations (written once, in `plans`) ------------------------------

    def sync(self, *, timeout: Within = DEFAULT_TIMEOUT) -> None:
        """(Re)synchronise; also the way to wait for the agent to come up."""
        self._exclusive(plans.sync(self._state, Deadline.of(timeout)))

    def execute(
        self, name: str, arguments: Mapping[str, Any] | None = None, *,
        timeout: Within = DEFAULT_TIMEOUT,
    ) -> Any:  # fmt: skip
        """Run agent command `name`; its `return` value, or `AgentError`."""
        return self._execute(name, arguments, Deadline.of(timeout))

    def ping(self, *, timeout: Within = DEFAULT_TIMEOUT) -> None:
        run(plans.command("guest-ping", None, Deadline.of(timeout)), self)

    def info(self, *, timeout: Within = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """The agent's version and the commands it supports."""
        info: dict[str, Any] = run(plans.command("guest-info", None, Deadline.of(timeout)), self)
        return info

    def exec(
        self, argv: Sequence[str], input: bytes | None = None, *,
        env: Mapping[str, str] | None = None, timeout: Within = DEFAULT_TIMEOUT,
    ) -> ExecResult:  # fmt: skip
        """Run `argv` in the guest; wait (bounded) for it; exit code and output."""
        return run(plans.exec_(argv, input, env, Deadline.of(timeout)), self)

    def read_file(self, path: str, *, timeout: Within = DEFAULT_TIMEOUT) -> bytes:
        """The whole content of `path` in the guest (in chunks)."""
        return run(plans.read_file(path, Deadline.of(timeout)), self)

    def write_file(self, path: str, data: bytes, *, timeout: Within = DEFAULT_TIMEOUT) -> None:
        """Create or replace `path` in the guest with `data` (in chunks)."""
        run(plans.write_file(path, data, Deadline.of(timeout)), self)

    def shutdown(self, mode: str = "powerdown", *, timeout: Within = DEFAULT_TIMEOUT) -> None:
        """Ask the guest to power down/halt/reboot. The agent sends no answer
        on success: wait for the VM (`vm.wait()`) to see it happen."""
        self._exclusive(plans.shutdown(self._state, mode, Deadline.of(timeout)))

    def fsfreeze_status(self, *, timeout: Within = DEFAULT_TIMEOUT) -> str:
        """ "thawed" or "frozen"."""
        status: str = run(plans.command("guest-fsfreeze-status", None, Deadline.of(timeout)), self)
        return status

    def network_interfaces(self, *, timeout: Within = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = run(
            plans.command("guest-network-get-interfaces", None, Deadline.of(timeout)), self
        )
        return result

    def close(self) -> None:
        """Close the channel; later calls raise `AgentGone`. Idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # -- primitives the plans call ------------------------------------------

    def _exclusive(self, plan: Plan[T]) -> T:
        with self._lock:
            return run(plan, self)

    def _execute(self, name: str, arguments: Mapping[str, Any] | None, deadline: Deadline) -> Any:
        return self._exclusive(plans.execute(self._state, name, arguments, deadline))

    def _open_socket(self) -> socket.socket:
        if self._sock is None:
            raise AgentGone(f"{self.name}: the channel is closed")
        return self._sock

    def _send(self, data: bytes, deadline: Deadline) -> bool:
        sock = self._open_socket()
        sock.settimeout(deadline.remaining())
        try:
            sock.sendall(data)
        except (TimeoutError, BlockingIOError):
            return False
        except OSError as exc:
            raise AgentGone(f"{self.name}: cannot send: {exc}") from exc
        return True

    def _wait_input(self, deadline: Deadline) -> bool:
        sock = self._open_socket()
        sock.settimeout(deadline.remaining())
        try:
            data = sock.recv(65536)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: no time was left
            return False
        except OSError as exc:
            raise AgentGone(f"{self.name}: {exc}") from exc
        if not data:
            self.close()
            raise AgentGone(f"{self.name}: the channel closed (QEMU exited?)")
        self._state.feed(data)
        return True

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)  # the agent has no completion event: exec polls
