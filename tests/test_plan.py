"""The plan runners: one operation's logic, driven blocking and from asyncio alike."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from vmpilot._util.plan import Call, Plan, arun, run


def _plan(log: list[str]) -> Plan[str]:
    try:
        got = yield Call("step", 1)
        log.append(f"got {got}")
        yield Call("fail")
    except KeyError as exc:
        log.append(f"caught {exc.args[0]}")
        return "recovered"
    finally:
        log.append("finally")
    return "not reached"


class SyncIO:
    def step(self, n: int) -> int:
        return n + 1

    def fail(self) -> None:
        raise KeyError("boom")


class AsyncIO:
    async def step(self, n: int) -> int:
        await asyncio.sleep(0)
        return n + 1

    async def fail(self) -> None:
        raise KeyError("boom")


def test_both_runners_send_results_and_throw_errors_into_the_plan() -> None:
    log_sync: list[str] = []
    log_async: list[str] = []
    assert run(_plan(log_sync), SyncIO()) == "recovered"
    assert asyncio.run(arun(_plan(log_async), AsyncIO())) == "recovered"
    assert log_sync == log_async == ["got 2", "caught boom", "finally"]


def test_an_error_the_plan_does_not_handle_reaches_the_caller() -> None:
    def plan() -> Plan[None]:
        yield Call("fail")

    with pytest.raises(KeyError):
        run(plan(), SyncIO())
    with pytest.raises(KeyError):
        asyncio.run(arun(plan(), AsyncIO()))


def test_a_plan_is_closed_when_the_caller_is_interrupted() -> None:
    closed: list[bool] = []

    def plan() -> Plan[Any]:
        try:
            yield Call("step", 0)
            yield Call("step", 0)
        finally:
            closed.append(True)

    class Interrupting:
        def step(self, n: int) -> int:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(plan(), Interrupting())
    assert closed == [True]
