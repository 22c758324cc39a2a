"""The pytest plugin, exercised the way users run it: pytester sessions in
subprocesses (one of them under pytest-xdist)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import QEMU

ARGS = ["-p", "no:cacheprovider", f"--vmpilot-qemu={QEMU}", "--vmpilot-accel=tcg"]


def test_qmp_vm_and_factory(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_qmp(qmp_vm):
            assert qmp_vm.execute("query-status")["running"]
            assert qmp_vm.accel == "tcg"

        def test_factory(vm_factory):
            a = vm_factory(machine="none", memory=16)
            b = vm_factory(machine="none", memory=16, launch=False)
            assert b.state == "new"
            a.shutdown()
        """
    )
    result = pytester.runpytest_subprocess(*ARGS)
    result.assert_outcomes(passed=2)


def test_leaked_vm_fails_the_test_and_is_killed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os
        def test_leaks(vm_factory):
            vm = vm_factory(machine="none", memory=16)
            open("pid", "w").write(str(vm.pid))
        """
    )
    result = pytester.runpytest_subprocess(*ARGS)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*1 VM(s) still running at the end of the test (killed now)*"])
    pid = int((pytester.path / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists()


def test_failing_test_gets_console_and_log_sections(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from vmpilot import guest

        def test_fails(vm_factory, tmp_path):
            bios = guest.tiny.write(str(tmp_path))
            vm = vm_factory(guest.tiny.config(bios))
            vm.console.expect(guest.tiny.READY, timeout=10)
            try:
                assert False, "boom"
            finally:
                vm.kill()
        """
    )
    result = pytester.runpytest_subprocess(*ARGS)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "vmpilot VM 0" in out and "console (tail)" in out and "TINY-GUEST READY" in out
    assert "QEMU log (tail)" in out and "full logs" in out


def test_options_qemu_and_keep_logs(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(
        """
        def test_runs(qmp_vm):
            qmp_vm.execute("query-name")
        """
    )
    keep = tmp_path / "logs"
    result = pytester.runpytest_subprocess(*ARGS, f"--vmpilot-keep-logs={keep}")
    result.assert_outcomes(passed=1)
    assert list(keep.glob("test_runs/*/qemu.log"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--vmpilot-qemu=/no/qemu")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*QEMU binary '/no/qemu' not found*"])


def test_async_fixtures_with_pytest_asyncio_and_anyio(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.asyncio
        async def test_asyncio(async_qmp_vm, async_vm_factory):
            assert (await async_qmp_vm.execute("query-status"))["running"]
            other = await async_vm_factory(machine="none", memory=16)
            await other.shutdown()

        @pytest.mark.anyio
        async def test_anyio(async_vm_factory):
            vm = await async_vm_factory(machine="none", memory=16)
            assert await vm.execute("query-name") == {}
            await vm.shutdown()

        @pytest.fixture
        def anyio_backend():
            return "asyncio"
        """
    )
    result = pytester.runpytest_subprocess(*ARGS)
    result.assert_outcomes(passed=2)


def test_linux_vm_fixture_and_xdist(pytester: pytest.Pytester, linux_guest: object) -> None:
    pytester.makepyfile(
        """
        import pytest

        def test_linux(vm):
            assert vm.shell.run("echo ok-$((6*7))") == (0, "ok-42\\n")

        @pytest.mark.parametrize("n", range(4))
        def test_many(qmp_vm, n):
            assert qmp_vm.execute("query-status")["status"] == "running"
        """
    )
    result = pytester.runpytest_subprocess(*ARGS, "-n", "2")
    result.assert_outcomes(passed=5)
