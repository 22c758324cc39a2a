"""`quit` sent by the user through a Machine's own QMP client: QEMU answers
and exits at once, and the Machine's exit watcher tears the VM down at the
same moment. The answer QEMU sent before it went must still reach the caller
(it used to fail now and then with "closed by the client")."""

from __future__ import annotations

from conftest import QEMU, run_async

from vmpilot import AsyncMachine, Machine

ROUNDS = 15


def test_quit_reply_reaches_the_caller_while_the_watcher_cleans_up() -> None:
    for _ in range(ROUNDS):
        vm = Machine(machine="none", memory=32, qemu=QEMU).launch()
        assert vm.qmp.execute("quit") == {}
        vm.shutdown(timeout=10)  # QEMU is gone already: graceful, not abnormal
        assert vm.exit_code == 0 and vm.state == "stopped"


def test_quit_reply_reaches_the_caller_asyncio() -> None:
    async def main() -> None:
        for _ in range(ROUNDS):
            vm = await AsyncMachine(machine="none", memory=32, qemu=QEMU).launch()
            assert await vm.qmp.execute("quit") == {}
            await vm.shutdown(timeout=10)
            assert vm.exit_code == 0 and vm.state == "stopped"

    run_async(main())
