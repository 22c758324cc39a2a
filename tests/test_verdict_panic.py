"""The panic verdict: a guest kernel panic (or a reset under no_reboot) is
never a success. Real panics in the bundled guest (`echo c >
/proc/sysrq-trigger`), on both faces, on `wait()` and on `shutdown()`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import QEMU, run_async

from vmpilot import (
    AbnormalShutdown,
    AsyncMachine,
    GuestError,
    GuestPanicked,
    GuestReset,
    Machine,
)
from vmpilot.console.core import panic_line
from vmpilot.guest import GuestImage

CRASH = "echo c > /proc/sysrq-trigger"
PANIC_TEXT = "Kernel panic - not syncing: sysrq triggered crash"


@pytest.fixture
def panicking(linux_guest: GuestImage) -> Iterator[Machine]:
    """A booted bundled guest, told to crash (its console not yet read)."""
    vm = Machine(linux_guest.config(qemu=QEMU)).launch()
    try:
        vm.shell.wait_ready(timeout=120)
        assert "-device" in vm.argv and "pvpanic" in vm.argv
        vm.console.send_line(CRASH)
        yield vm
    finally:
        vm.kill()


def _check(err: GuestPanicked) -> None:
    assert PANIC_TEXT in err.panic
    assert PANIC_TEXT in str(err) and "QEMU: " in str(err)
    assert "console (tail)" in str(err) and err.console_tail
    assert "\x1b" not in str(err)  # busybox's ESC[6n is shown escaped, never raw
    assert isinstance(err, AbnormalShutdown) and isinstance(err, GuestError)


def test_wait_raises_guest_panicked_with_the_panic_text(panicking: Machine) -> None:
    with pytest.raises(GuestPanicked) as info:
        panicking.wait(timeout=120)
    _check(info.value)
    assert info.value.reason == "guest-panic"
    assert panicking.shutdown_reason == "guest-panic" and panicking.state == "stopped"
    panicking.shutdown()  # reported once, like a crash: later calls are quiet


def test_expect_fails_at_once_then_shutdown_raises(panicking: Machine) -> None:
    # without the default fail pattern this would end in ConsoleClosed (QEMU exits)
    with pytest.raises(GuestPanicked, match="the guest kernel panicked") as info:
        panicking.console.expect("never printed", timeout=120)
    assert "Kernel panic - not syncing" in info.value.panic
    with pytest.raises(GuestPanicked) as down:
        panicking.shutdown(timeout=60)
    _check(down.value)


def test_async_wait_and_shutdown_raise_guest_panicked(linux_guest: GuestImage) -> None:
    async def crash() -> AsyncMachine:
        vm = await AsyncMachine(linux_guest.config(qemu=QEMU)).launch()
        await vm.shell.wait_ready(timeout=120)
        vm.console.send_line(CRASH)
        return vm

    async def main() -> tuple[GuestPanicked, GuestPanicked]:
        vm = await crash()
        try:
            with pytest.raises(GuestPanicked) as waited:
                await vm.wait(timeout=120)
        finally:
            await vm.kill()
        vm2 = await crash()
        try:
            with pytest.raises(GuestPanicked):
                await vm2.console.expect("never printed", timeout=120)
            with pytest.raises(GuestPanicked) as down:
                await vm2.shutdown(timeout=60)
        finally:
            await vm2.kill()
        assert vm.shutdown_reason == "guest-panic"
        # a quit may overtake pvpanic (the console's panic line came first): a panic all the same
        assert vm2.shutdown_reason in ("guest-panic", "host-qmp-quit")
        return waited.value, down.value

    for err in run_async(main()):
        _check(err)


def test_reset_under_no_reboot_is_not_a_success(linux_guest: GuestImage) -> None:
    with Machine(linux_guest.config(qemu=QEMU)) as vm:
        vm.shell.wait_ready(timeout=120)
        vm.console.send_line("reboot -f")
        with pytest.raises(GuestReset, match="reset itself under no_reboot"):
            vm.wait(timeout=120)
        assert vm.shutdown_reason == "guest-reset"


def test_clean_endings_name_their_reason(linux_guest: GuestImage) -> None:
    with Machine(linux_guest.config(qemu=QEMU)) as vm:
        vm.shell.wait_ready(timeout=120)
        vm.console.send_line("poweroff -f")
        assert vm.wait(timeout=120) == 0
    assert vm.shutdown_reason == "guest-shutdown"
    quit_vm = Machine(machine="none", memory=32, qemu=QEMU).launch()
    quit_vm.shutdown()
    assert quit_vm.shutdown_reason == "host-qmp-quit"


def test_panic_pattern_ignores_an_echoed_command_line() -> None:
    echoed = "guest# grep 'Kernel panic - not syncing' /var/log/x\r\n"
    assert panic_line(echoed) == ""
    assert panic_line(f"[    3.59] {PANIC_TEXT}\r\n") == f"[    3.59] {PANIC_TEXT}"
    assert panic_line(f"{PANIC_TEXT}\n") == PANIC_TEXT  # a kernel without printk times
