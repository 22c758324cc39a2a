"""The operations both faces share (shutdown, wait, kill as plans): the
operation lock holds on the asyncio face too, and the caller's deadline is
the one every step uses."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from conftest import QEMU, run_async

from vmpilot import AbnormalShutdown, AsyncMachine, Machine


def test_async_kill_waits_for_a_shutdown_in_progress() -> None:
    """A kill racing a graceful shutdown must not turn the shutdown's failure
    into a silent success: it queues behind it, as Machine.kill does."""

    async def main() -> BaseException | None:
        vm = await AsyncMachine(machine="none", memory=32, qemu=QEMU).launch()
        assert vm.pid is not None
        os.kill(vm.pid, signal.SIGSTOP)  # our own QEMU: it cannot answer `quit`
        # tasks start in creation order: shutdown holds the lock before kill runs
        shutdown = asyncio.create_task(vm.shutdown(timeout=1))
        kill = asyncio.create_task(vm.kill())
        results = await asyncio.gather(shutdown, kill, return_exceptions=True)
        assert results[1] is None and vm.state == "stopped"
        return results[0] if isinstance(results[0], BaseException) else None

    err = run_async(main())
    assert isinstance(err, AbnormalShutdown) and "QEMU was killed" in str(err)


def test_shutdown_deadline_covers_the_command_and_the_exit() -> None:
    vm = Machine(machine="none", memory=32, qemu=QEMU).launch()
    assert vm.pid is not None
    os.kill(vm.pid, signal.SIGSTOP)
    with pytest.raises(AbnormalShutdown, match=r"within 0.5 s|\(quit\) failed"):
        vm.shutdown(timeout=0.5)
    assert vm.state == "stopped" and vm.exit_signal == signal.SIGKILL
