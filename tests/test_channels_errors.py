"""Every error class lives in `vmpilot.errors`, is exported from `vmpilot`,
and a closed channel of any kind is a `ChannelClosed` (keeping its old base)."""

from __future__ import annotations

import socket

import pytest
from conftest import run_async

import vmpilot
from vmpilot import (
    AgentGone,
    ChannelClosed,
    ConsoleClosed,
    Disconnected,
    GuestError,
    QMPError,
    QtestClosed,
    VMError,
    errors,
)
from vmpilot.console import AsyncConsole, Console
from vmpilot.qga import AsyncGuestAgent, GuestAgent
from vmpilot.qtest import Qtest


def test_every_error_class_is_defined_in_errors_and_exported() -> None:
    classes = {
        name: obj
        for name, obj in vars(errors).items()
        if isinstance(obj, type) and issubclass(obj, BaseException)
    }
    assert {
        "AgentError",
        "AgentTimeout",
        "AgentGone",
        "ExpectTimeout",
        "QtestError",
        "ConfigError",
        "ValidationError",
        "PackageError",
    } <= set(classes)
    for name, cls in classes.items():
        assert cls.__module__ == "vmpilot.errors"
        assert getattr(vmpilot, name) is cls, f"vmpilot.{name}"
        assert name in vmpilot.__all__
    # still importable where they used to live
    from vmpilot.console import ExpectTimeout
    from vmpilot.qga import AgentError, AgentTimeout
    from vmpilot.qtest import QtestError

    assert (ExpectTimeout, AgentError, AgentTimeout, QtestError) == (
        errors.ExpectTimeout, errors.AgentError, errors.AgentTimeout, errors.QtestError,
    )  # fmt: skip


def test_closed_channels_share_one_base_and_keep_their_own() -> None:
    assert issubclass(Disconnected, ChannelClosed) and issubclass(Disconnected, QMPError)
    assert issubclass(ConsoleClosed, ChannelClosed) and issubclass(ConsoleClosed, GuestError)
    assert issubclass(AgentGone, ChannelClosed) and issubclass(AgentGone, GuestError)
    assert issubclass(QtestClosed, ChannelClosed) and issubclass(ChannelClosed, VMError)


def test_each_closed_channel_raises_channel_closed() -> None:
    for make in (Console, GuestAgent, Qtest):
        ours, peer = socket.socketpair()
        channel = make(ours)
        channel.close()
        peer.close()
        with pytest.raises(ChannelClosed):
            if isinstance(channel, Console):
                channel.send("x")
            elif isinstance(channel, GuestAgent):
                channel.ping(timeout=1)
            else:
                channel.command("clock_step", timeout=1)


def test_each_closed_asyncio_channel_raises_channel_closed() -> None:
    async def main() -> None:
        ours, peer = socket.socketpair()
        con = AsyncConsole(ours)
        con.close()
        with pytest.raises(ConsoleClosed):
            con.send("x")
        ours, peer2 = socket.socketpair()
        agent = AsyncGuestAgent(ours)
        peer2.close()  # the peer went away: the call ends at once, not at its timeout
        with pytest.raises(AgentGone):
            await agent.ping(timeout=30)
        peer.close()
        agent.close()

    run_async(main())
