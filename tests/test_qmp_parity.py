"""QMPClient and AsyncQMPClient expose the same operations with the same
parameters (issue 10: the twins had drifted), and help() shows no Ellipsis."""

from __future__ import annotations

import inspect
import pydoc

import pytest

from vmpilot.qmp import AsyncQMPClient, QMPClient
from vmpilot.qmp._client import CLIENT_TIMEOUT

ASYNC_ONLY = {"aclose"}  # `close()` is immediate on both; aclose is for `async with` style


def public(cls: type) -> dict[str, object]:
    return {
        name: member
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and name not in ASYNC_ONLY
    }


def params(member: object) -> list[tuple[str, object, object]]:
    fn = member.fget if isinstance(member, property) else member  # type: ignore[attr-defined]
    if not callable(fn):
        return []
    sig = inspect.signature(fn)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_same_public_operations() -> None:
    assert sorted(public(QMPClient)) == sorted(public(AsyncQMPClient))


@pytest.mark.parametrize("name", sorted(public(QMPClient)))
def test_same_parameters(name: str) -> None:
    sync = inspect.getattr_static(QMPClient, name)
    aio = inspect.getattr_static(AsyncQMPClient, name)
    assert type(sync) is type(aio) or (callable(sync) and callable(aio))
    assert params(getattr(QMPClient, name)) == params(getattr(AsyncQMPClient, name))


@pytest.mark.parametrize("cls", [QMPClient, AsyncQMPClient])
def test_help_shows_a_named_default_timeout(cls: type) -> None:
    text = pydoc.render_doc(cls)
    assert "Ellipsis" not in text and "= ..." not in text
    assert "timeout: 'TimeoutArg' = CLIENT_TIMEOUT" in text


@pytest.mark.parametrize("cls", [QMPClient, AsyncQMPClient])
def test_timeout_is_keyword_only_everywhere(cls: type) -> None:
    for name, member in public(cls).items():
        for pname, kind, default in params(member):
            if pname == "timeout":
                assert kind is inspect.Parameter.KEYWORD_ONLY, name
                if name not in ("connect",):
                    assert default is CLIENT_TIMEOUT, name
