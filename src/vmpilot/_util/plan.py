"""Operations written once, run by two thin runners.

An operation's logic (the order of its steps, its deadline, its verdict) lives
in one generator: a *plan*. The plan never does I/O; it yields `Call`s, each a
request for one primitive step of the face it runs on ("execute this QMP
command", "wait for QEMU to exit until this deadline"). `run` performs each
call by calling the face's method of that name; `arun` awaits it. What a step
returns is sent back into the plan, what it raises is thrown into it, so
`try`/`except`/`finally` in a plan mean the same on both faces. This carries
the sans-I/O idea of `qmp.protocol` up to Machine, console, shell and agent:
the blocking and asyncio classes only supply the primitives.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

T = TypeVar("T")


class Call:
    """One primitive step: call `io.<name>(*args, **kwargs)` (awaited on asyncio)."""

    __slots__ = ("args", "kwargs", "name")

    def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.name = name
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        return f"Call({self.name!r}, *{self.args!r}, **{self.kwargs!r})"


Plan = Generator[Call, Any, T]


def run(plan: Plan[T], io: object) -> T:
    """Drive `plan` with `io`'s blocking primitives."""
    try:
        step = next(plan)
        while True:
            try:
                result = getattr(io, step.name)(*step.args, **step.kwargs)
            except BaseException as exc:  # the plan decides (it re-raises what it does not handle)
                step = plan.throw(exc)
            else:
                step = plan.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        plan.close()


async def arun(plan: Plan[T], io: object) -> T:
    """Drive `plan` with `io`'s asyncio primitives (each a coroutine function)."""
    try:
        step = next(plan)
        while True:
            try:
                result = await getattr(io, step.name)(*step.args, **step.kwargs)
            except BaseException as exc:
                step = plan.throw(exc)
            else:
                step = plan.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        plan.close()
