"""Console operations, each written once as a plan (see `_util.plan`).

A plan reads the console's state (its buffer, whether it closed) and yields
the only two primitives a console face supplies:

- `Call("_wait_data", seen, deadline)`: return once more than `seen` bytes
  have been received in all, the console closed, or `deadline` passed;
- `Call("_send", data)`: type `data` into the console.

`Console` runs them blocking (holding its lock, which `_wait_data` releases
while it waits), `AsyncConsole` on the event loop; `Shell` composes them.
"""

from __future__ import annotations

import time

from .._util.deadline import Deadline
from .._util.plan import Call, Plan
from ..errors import ConsoleClosed, ExpectTimeout, GuestError, GuestPanicked
from ._base import ConsoleBase
from .core import PANIC, Match, Patterns, compile_all, compile_pattern, describe, visible


def expect(
    con: ConsoleBase, patterns: Patterns, fail: Patterns | None, deadline: Deadline
) -> Plan[Match]:
    """The first of `patterns` (consumed up to its end); `GuestError` at once
    for a fail pattern (`GuestPanicked` for the default one, `core.PANIC`),
    `ConsoleClosed` once the console closes."""
    pats = compile_all(patterns)
    fails = compile_all(fail) if fail is not None else []  # the caller's first (on a tie)
    fails += [compile_pattern(p) for p in con.fail_patterns]
    label = describe(patterns)
    buf = con._buf
    scanned = buf.scanned_before
    while True:
        found = buf.search(pats + fails, scanned)
        if found is not None:
            index, m = found
            if index >= len(pats):
                seen = visible(m[0])
                buf.consume(m.end())
                if fails[index - len(pats)] is PANIC:
                    why = con._failure(f"the guest kernel panicked ({seen})", label, None)
                    raise GuestPanicked(why, panic=seen, console_tail=con.tail())
                raise GuestError(con._failure(f"failure pattern matched {seen!r}", label, None))
            match = Match(index, m, bytes(buf.data[: m.start()]))
            buf.consume(m.end())
            return match
        scanned = buf.total
        if con.closed_reason is not None:
            raise ConsoleClosed(con._failure(f"console closed ({con.closed_reason})", label, None))
        if deadline.expired:
            limit = deadline.timeout
            raise ExpectTimeout(con._failure("not seen", label, limit), label, limit)
        yield Call("_wait_data", scanned, deadline)


def read_until(con: ConsoleBase, pattern: Patterns, deadline: Deadline) -> Plan[str]:
    m = yield from expect(con, pattern, None, deadline)
    return (m.before + m.matched).decode(errors="replace")


def settle(con: ConsoleBase, quiet: float, deadline: Deadline) -> Plan[str]:
    """Everything pending once nothing arrived for `quiet` seconds."""
    buf = con._buf
    seen, since = buf.total, time.monotonic()
    while True:
        now = time.monotonic()
        if buf.total != seen:
            seen, since = buf.total, now
        if now - since >= quiet or con.closed_reason is not None:
            return buf.take_all()
        if deadline.expired:
            limit = deadline.timeout or 0.0
            raise ExpectTimeout(
                f"console of {con.name} did not go quiet for {quiet:g} s within {limit:g} s; "
                f"last console output:\n{con.tail()}",
                "a quiet console",
                limit,
            )
        yield Call("_wait_data", seen, deadline.within(quiet - (now - since)))
