"""AsyncMachine: the same contract as Machine, from asyncio."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from conftest import QEMU, run_async

from vmpilot import AbnormalShutdown, AsyncMachine, Disconnected, LaunchError


def none_vm(**kw: object) -> AsyncMachine:
    return AsyncMachine(machine="none", memory=32, qemu=QEMU, **kw)  # type: ignore[arg-type]


def test_launch_execute_shutdown() -> None:
    async def main() -> None:
        async with none_vm() as vm:
            assert vm.state == "running"
            assert (await vm.execute("query-status"))["running"]
            await vm.execute("stop")
            assert (await vm.wait_event("STOP")).name == "STOP"
            tmp = vm.temp_dir
        assert vm.state == "stopped" and vm.exit_code == 0
        assert tmp and not os.path.exists(tmp)

    run_async(main())


def test_many_machines_concurrently() -> None:
    async def main() -> list[int | None]:
        vms = [none_vm() for _ in range(6)]
        await asyncio.gather(*(vm.launch() for vm in vms))
        await asyncio.gather(*(vm.shutdown() for vm in vms))
        return [vm.exit_code for vm in vms]

    assert run_async(main()) == [0] * 6


def test_exception_in_async_with_kills() -> None:
    async def main() -> AsyncMachine:
        vm = none_vm()
        with pytest.raises(RuntimeError, match="boom"):
            async with vm:
                raise RuntimeError("boom")
        return vm

    vm = run_async(main())
    assert vm.state == "stopped" and vm.exit_signal == signal.SIGKILL and not vm.crashed


def test_in_flight_command_when_qemu_dies_and_death_noticed() -> None:
    async def main() -> None:
        vm = await none_vm().launch()
        assert vm.pid is not None
        os.kill(vm.pid, signal.SIGSTOP)
        call = asyncio.ensure_future(vm.execute("query-status", timeout=30))
        await asyncio.sleep(0)
        t0 = time.monotonic()
        os.kill(vm.pid, signal.SIGABRT)
        os.kill(vm.pid, signal.SIGCONT)
        with pytest.raises(Disconnected):
            await call
        assert time.monotonic() - t0 < 1
        with pytest.raises(AbnormalShutdown, match="crashed.*SIGABRT"):
            await vm.wait(timeout=10)
        assert vm.crashed and vm.state == "stopped"

    run_async(main())


def test_sigstopped_shutdown_abnormal_and_wait_timeout() -> None:
    async def main() -> None:
        vm = await none_vm().launch()
        assert vm.pid is not None
        os.kill(vm.pid, signal.SIGSTOP)
        with pytest.raises(AbnormalShutdown):
            await vm.shutdown(timeout=0.5)
        assert vm.state == "stopped" and not vm.crashed
        vm2 = await none_vm().launch()
        with pytest.raises(AbnormalShutdown, match="did not exit by itself"):
            await vm2.wait(timeout=0.3)
        await vm2.kill()  # no-op on a stopped VM

    run_async(main())


def test_async_launch_error() -> None:
    async def main() -> None:
        vm = none_vm(extra_args=["-no-such-option"])
        with pytest.raises(LaunchError, match="invalid option"):
            await vm.launch()
        assert vm.state == "failed" and vm.temp_dir is None

    run_async(main())


def test_abandon_after_the_loop_is_gone_kills_and_cleans_up() -> None:
    """Teardown code without the VM's loop (the pytest plugin's leak path)."""

    async def main() -> AsyncMachine:
        return await none_vm().launch()

    vm = run_async(main())  # its loop is closed now: `await vm.kill()` is impossible
    pid, tmp = vm.pid, vm.temp_dir
    assert pid is not None and tmp and os.path.isdir(tmp)
    vm.abandon()
    assert vm.state == "stopped" and vm.exit_signal == signal.SIGKILL
    assert not os.path.exists(tmp) and not os.path.exists(f"/proc/{pid}")
    vm.abandon()  # once stopped, a no-op
