"""Guest agent operations, each written once as a plan (see `_util.plan`).

Two layers. The exchange with the agent (`sync`, `execute`, `shutdown`) runs
while the face holds its lock, and yields its primitives:

- `Call("_send", data, deadline)`: write `data`; False if the deadline passed;
- `Call("_wait_input", deadline)`: wait for more input (fed into the
  `AgentState`); False if the deadline passed, `AgentGone` if it closed.

The operations built on it (`exec` and its status polling, files, queries)
call one agent command at a time, so other callers can interleave, through

- `Call("_execute", name, arguments, deadline)`: the `execute` plan, locked;
- `Call("_sleep", seconds)`: the pause between `guest-exec-status` polls.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._util.deadline import Deadline
from .._util.plan import Call, Plan
from ..errors import AgentTimeout, GuestError
from .core import (
    CHUNK,
    POLL_FIRST,
    POLL_MAX,
    SHUTDOWN_MODES,
    AgentState,
    ExecResult,
    exec_args,
    exec_result,
    result,
)

# -- the exchange (run under the face's lock) ---------------------------------


def _timed_out(st: AgentState, what: str, deadline: Deadline) -> AgentTimeout:
    st.proto.synced = False  # a late answer may still come: resync next time
    return AgentTimeout(what, deadline.timeout)


def _send(st: AgentState, data: bytes, deadline: Deadline, what: str) -> Plan[None]:
    if not (yield Call("_send", data, deadline)):
        raise _timed_out(st, what, deadline)


def _wait(st: AgentState, done: Callable[[], bool], deadline: Deadline, what: str) -> Plan[None]:
    while not done():
        # checked before each wait: input that keeps coming must not carry
        # the call past its deadline
        if deadline.expired or not (yield Call("_wait_input", deadline)):
            raise _timed_out(st, what, deadline)


def sync(st: AgentState, deadline: Deadline) -> Plan[None]:
    """(Re)synchronise: every answer before our token's is dropped."""
    what = "the guest agent (guest-sync-delimited)"
    st.pending.clear()
    yield from _send(st, st.proto.sync_request(), deadline, what)
    yield from _wait(st, lambda: st.proto.synced, deadline, what)


def execute(
    st: AgentState, name: str, arguments: Mapping[str, Any] | None, deadline: Deadline
) -> Plan[Any]:
    """Agent command `name`: its `return` value, or `AgentError`."""
    if not st.proto.synced:
        yield from sync(st, deadline)
    what = f"the agent's answer to {name!r}"
    yield from _send(st, st.proto.request(name, arguments), deadline, what)
    yield from _wait(st, lambda: bool(st.pending), deadline, what)
    return result(name, st.pending.popleft())


def shutdown(st: AgentState, mode: str, deadline: Deadline) -> Plan[None]:
    """Ask the guest to power down/halt/reboot; the agent sends no answer on
    success, so the next call resynchronises."""
    if mode not in SHUTDOWN_MODES:
        raise ValueError(f"mode must be powerdown, halt or reboot, not {mode!r}")
    if not st.proto.synced:
        yield from sync(st, deadline)
    request = st.proto.request("guest-shutdown", {"mode": mode})
    yield from _send(st, request, deadline, "the agent to take guest-shutdown")
    st.proto.synced = False


# -- operations built on single commands ------------------------------------------


def command(name: str, arguments: Mapping[str, Any] | None, deadline: Deadline) -> Plan[Any]:
    return (yield Call("_execute", name, arguments, deadline))


def exec_(
    argv: Sequence[str],
    input: bytes | None,
    env: Mapping[str, str] | None,
    deadline: Deadline,
) -> Plan[ExecResult]:
    """Run `argv`, then poll `guest-exec-status` (backing off) until it exits."""
    started = yield Call("_execute", "guest-exec", exec_args(argv, input, env), deadline)
    pid = started["pid"]
    what = f"{list(argv)!r} (pid {pid}) to finish in the guest"
    delay = POLL_FIRST
    while True:
        try:
            status = yield Call("_execute", "guest-exec-status", {"pid": pid}, deadline)
        except AgentTimeout as exc:
            raise AgentTimeout(what, deadline.timeout) from exc
        if status.get("exited"):
            return exec_result(status)
        remaining = deadline.remaining()
        if remaining == 0:
            raise AgentTimeout(what, deadline.timeout)
        yield Call("_sleep", delay if remaining is None else min(delay, remaining))
        delay = min(delay * 2, POLL_MAX)


def _closing(handle: int, deadline: Deadline, failing: bool) -> Plan[None]:
    try:
        yield Call("_execute", "guest-file-close", {"handle": handle}, deadline)
    except GuestError:
        if not failing:
            raise  # when the transfer failed, its error is the one to see


def read_file(path: str, deadline: Deadline) -> Plan[bytes]:
    handle = yield Call("_execute", "guest-file-open", {"path": path, "mode": "r"}, deadline)
    data = bytearray()
    try:
        while True:
            chunk = yield Call(
                "_execute", "guest-file-read", {"handle": handle, "count": CHUNK}, deadline
            )
            data += base64.b64decode(chunk.get("buf-b64", ""))
            if chunk.get("eof") or not chunk.get("count"):
                break
    except BaseException:
        yield from _closing(handle, deadline, failing=True)
        raise
    yield from _closing(handle, deadline, failing=False)
    return bytes(data)


def write_file(path: str, data: bytes, deadline: Deadline) -> Plan[None]:
    handle = yield Call("_execute", "guest-file-open", {"path": path, "mode": "w"}, deadline)
    try:
        for i in range(0, len(data), CHUNK):
            piece = base64.b64encode(data[i : i + CHUNK]).decode()
            yield Call(
                "_execute", "guest-file-write", {"handle": handle, "buf-b64": piece}, deadline
            )
        yield Call("_execute", "guest-file-flush", {"handle": handle}, deadline)
    except BaseException:
        yield from _closing(handle, deadline, failing=True)
        raise
    yield from _closing(handle, deadline, failing=False)
