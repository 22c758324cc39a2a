"""Every sync/asyncio pair offers the same operations with the same
parameters: the faces are thin over one implementation, and this test keeps
them from drifting apart again.

A public name (not starting with `_`) on one face must exist on the other;
for callables, the parameters must agree in name, kind and default. Only the
names in `FACE_SPECIFIC` may differ, each for a reason given there.
"""

from __future__ import annotations

import inspect
import socket
from typing import Any

import pytest
from conftest import run_async

from vmpilot import AsyncMachine, AsyncQMPClient, Machine, QMPClient
from vmpilot.console import AsyncConsole, Console
from vmpilot.qga import AsyncGuestAgent, GuestAgent
from vmpilot.qtest import AsyncQtest, Qtest
from vmpilot.shell import AsyncShell, Shell

# names only one face has, on purpose
FACE_SPECIFIC = {
    "__enter__", "__exit__",  # with ... (sync)
    "__aenter__", "__aexit__",  # async with ... (asyncio)
    "__iter__", "__next__", "__aiter__", "__anext__",
    "aclose",  # asyncio's close that awaits the end
    "unsent",  # AsyncConsole buffers input its socket did not take; Console's send blocks
}  # fmt: skip

PAIRS = [
    pytest.param(Machine, AsyncMachine, id="Machine"),
    pytest.param(QMPClient, AsyncQMPClient, id="QMPClient"),
    pytest.param(GuestAgent, AsyncGuestAgent, id="GuestAgent"),
    pytest.param(Console, AsyncConsole, id="Console"),
    pytest.param(Shell, AsyncShell, id="Shell"),
    pytest.param(Qtest, AsyncQtest, id="Qtest"),
]  # fmt: skip


def _public(cls: type) -> dict[str, Any]:
    names = {n for n in dir(cls) if not n.startswith("_")} | {"__init__"}
    names |= {n for n in FACE_SPECIFIC if hasattr(cls, n)}
    return {n: inspect.getattr_static(cls, n) for n in names if n not in FACE_SPECIFIC}


def _params(member: Any) -> list[tuple[str, str, Any]] | None:
    """(name, kind, default) of each parameter; None for a non-callable."""
    if isinstance(member, property):
        return None
    func = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
    if not callable(func):
        return None
    return [(p.name, p.kind.name, p.default) for p in inspect.signature(func).parameters.values()]


def _kind(member: Any) -> str:
    if isinstance(member, property):
        return "property"
    if isinstance(member, classmethod):
        return "classmethod"
    if isinstance(member, staticmethod):
        return "staticmethod"
    return "method" if callable(member) else "attribute"


def differences(sync_cls: type, async_cls: type) -> list[str]:
    """What one face offers and the other does not, one line each."""
    sync, aio = _public(sync_cls), _public(async_cls)
    out = [f"only {sync_cls.__name__} has {n}" for n in sorted(sync.keys() - aio.keys())]
    out += [f"only {async_cls.__name__} has {n}" for n in sorted(aio.keys() - sync.keys())]
    for name in sorted(sync.keys() & aio.keys()):
        a, b = sync[name], aio[name]
        if _kind(a) != _kind(b):
            out.append(f"{name}: a {_kind(a)} on {sync_cls.__name__}, a {_kind(b)} on the other")
            continue
        pa, pb = _params(a), _params(b)
        if pa != pb:
            out.append(f"{name}: parameters differ: {pa} vs {pb}")
    return out


@pytest.mark.parametrize(("sync_cls", "async_cls"), PAIRS)
def test_sync_and_asyncio_faces_offer_the_same_operations(sync_cls: type, async_cls: type) -> None:
    assert differences(sync_cls, async_cls) == []


def test_the_check_sees_a_missing_operation_and_a_changed_parameter() -> None:
    class A:
        def op(self, x: int, *, timeout: float = 1.0) -> None: ...
        def gone(self) -> None: ...

    class B:
        async def op(self, x: int, *, timeout: float = 2.0) -> None: ...

    found = differences(A, B)
    assert found[0] == "only A has gone"
    assert found[1].startswith("op: parameters differ") and len(found) == 2


CHANNELS = [Console, AsyncConsole, GuestAgent, AsyncGuestAgent, Shell, AsyncShell]


@pytest.mark.parametrize("cls", CHANNELS, ids=lambda c: c.__name__)
def test_timeout_is_keyword_only_with_a_named_default(cls: type) -> None:
    """`help()` shows a number, never `Ellipsis`; no timeout is positional."""
    checked = 0
    for name, member in _public(cls).items():
        params = _params(member)
        for pname, kind, default in params or []:
            if pname == "timeout":
                checked += 1
                assert kind == "KEYWORD_ONLY", f"{cls.__name__}.{name}"
                assert isinstance(default, float), f"{cls.__name__}.{name}: {default!r}"
    assert checked


def test_channel_instances_have_the_same_public_attributes() -> None:
    """What `__init__` sets (`name`, `fail_patterns`, `listeners`, …) counts too."""

    def public(obj: object) -> set[str]:
        return {n for n in vars(obj) if not n.startswith("_")}

    async def main() -> None:
        made: list[tuple[object, object]] = []
        socks = [socket.socketpair() for _ in range(4)]
        try:
            console, aconsole = Console(socks[0][0]), AsyncConsole(socks[1][0])
            made.append((console, aconsole))
            made.append((GuestAgent(socks[2][0]), AsyncGuestAgent(socks[3][0])))
            made.append((Shell(console), AsyncShell(aconsole)))
            for sync, aio in made:
                assert public(sync) == public(aio), type(sync).__name__
        finally:
            for pair in made[:2]:
                for channel in pair:
                    channel.close()  # type: ignore[attr-defined]
            for a, b in socks:
                a.close()
                b.close()

    run_async(main())
