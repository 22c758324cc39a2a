"""Shell recovery: a timed-out command is interrupted and the shell comes
back; errors and report sections show the command, never the markers, and
never a raw control character."""

from __future__ import annotations

import pytest
from conftest import QEMU, run_async

from vmpilot import AsyncMachine, ExpectTimeout, Machine
from vmpilot.guest import GuestImage
from vmpilot.shell import ShellTimeout, _script, scrub

ARGS = ["-p", "no:cacheprovider", f"--vmpilot-qemu={QEMU}", "--vmpilot-accel=tcg"]


def _check(err: ShellTimeout) -> None:
    text = str(err)
    assert err.command == "echo started; sleep 100" and err.output == "started\n"
    assert "'echo started; sleep 100' did not finish within 2 s" in text
    assert "interrupted (Ctrl-C) and the shell is ready again" in text
    assert "VMP" not in text and "\x1b" not in text
    assert isinstance(err, ExpectTimeout) and err.timeout == 2


def test_timed_out_run_is_interrupted_and_the_next_run_works(linux_guest: GuestImage) -> None:
    with Machine(linux_guest.config(qemu=QEMU)) as vm:
        vm.shell.wait_ready(timeout=120)
        with pytest.raises(ShellTimeout) as info:
            vm.shell.run("echo started; sleep 100", timeout=2)
        _check(info.value)
        assert vm.shell.run("echo ok", timeout=60) == (0, "ok\n")
        assert vm.shell.run("jobs; ps | grep -c 'sleep 10[0]'", timeout=60)[1] == "0\n"
        vm.shutdown(method="powerdown")


def test_async_timed_out_run_is_interrupted_and_the_next_run_works(
    linux_guest: GuestImage,
) -> None:
    async def main() -> tuple[ShellTimeout, tuple[int, str]]:
        async with AsyncMachine(linux_guest.config(qemu=QEMU)) as vm:
            await vm.shell.wait_ready(timeout=120)
            with pytest.raises(ShellTimeout) as info:
                await vm.shell.run("echo started; sleep 100", timeout=2)
            after = await vm.shell.run("echo ok", timeout=60)
            await vm.shutdown(method="powerdown")
            return info.value, after

    err, after = run_async(main())
    _check(err)
    assert after == (0, "ok\n")


def test_scrub_shows_the_command_not_the_markers() -> None:
    token = "0123456789ab"
    typed = _script("echo hi && sleep 1", token)
    # busybox wraps the echoed line at 80 columns with "\r\r\n"
    echoed = typed[:70] + "\r\r\n" + typed[70:]
    console = f"guest# \x1b[6n{echoed}\r\nVMPB{token}\r\nhi\r\n\r\nVMPE{token} 0\r\nguest# "
    assert scrub(console) == "guest# \\x1b[6necho hi && sleep 1\nhi\n\nguest# "


def test_report_sections_hide_markers_and_escape_controls(
    pytester: pytest.Pytester, linux_guest: GuestImage
) -> None:
    del linux_guest  # built (cached) for the inner session
    pytester.makepyfile(
        """
        def test_fails(vm):
            assert vm.shell.run("echo hello-from-guest")[0] == 0
            assert False, "boom"
        """
    )
    result = pytester.runpytest_subprocess(*ARGS)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "console (tail)" in out and "echo hello-from-guest" in out
    assert "VMPB" not in out and "VMP''" not in out and "\x1b" not in out
    assert "\\x1b[6n" in out


def test_scrub_removes_a_resync_marker_the_tty_wrapped_after_printf() -> None:
    """Seen in CI: the resync line's echo wrapped right after `printf `."""
    raw = (
        "guest# echo started; sleep 100\r\nstarted\r\n"
        "^Cprintf \r\n'VMP''Sdf4cf7b72ba1\\n'\r\nguest# \r\n"
    )
    shown = scrub(raw)
    assert "VMP" not in shown and "printf" not in shown
    assert shown == "guest# echo started; sleep 100\nstarted\n^C\n\nguest# \n"
