"""What vmpilot logs: QMP traffic at DEBUG on `vmpilot.qmp`, each line naming
its connection; lifecycle steps at INFO on `vmpilot.machine`; nothing built
when disabled; and the pytest plugin's log section in a failing test's report."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import QEMU, run_async

from vmpilot import AsyncMachine, Machine
from vmpilot.qmp import QMPClient


def _messages(caplog: pytest.LogCaptureFixture, logger: str, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == level]


def test_qmp_traffic_at_debug_with_connection_names(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG, logger="vmpilot")
    with Machine(machine="none", memory=32, accel="tcg", qemu=QEMU, name="logvm") as vm:
        pid = vm.pid
        vm.execute("stop")
        server = vm.serve_qmp(tmp_path / "qmp.sock")
        with QMPClient.connect(server.path) as client:
            client.execute("query-name")
    traffic = _messages(caplog, "vmpilot.qmp", logging.DEBUG)
    me = "logvm"  # the Machine's connection carries the VM's name
    assert pid is not None
    assert f'{me} -> {{"execute":"stop","id":2}}' in traffic  # the command as sent
    assert any(m.startswith(f"{me} <- Reply(id=2, value={{}}, command='stop')") for m in traffic)
    assert any(m.startswith(f"{me} <- Event('STOP'") for m in traffic)
    # the relay: the client's own connection, the server's side of it, and upstream
    path = str(tmp_path / "qmp.sock")
    assert f'{path} -> {{"execute":"query-name","id":2}}' in traffic
    served = [m for m in traffic if re.match(rf"{re.escape(path)} client 1 \(pid \d+\) ", m)]
    assert any('-> {"execute":"query-name","id":2}' in m for m in served)
    assert any('<- {"return":{"name":"logvm"},"id":2}' in m for m in served)
    assert any(m.startswith(f'{me} -> {{"execute":"query-name","id":') for m in traffic)


def test_lifecycle_steps_at_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vmpilot.machine")
    with Machine(machine="none", memory=32, accel="tcg", qemu=QEMU, name="life") as vm:
        pid = vm.pid
    with Machine(machine="none", memory=32, accel="tcg", qemu=QEMU, name="killed") as other:
        other.kill()
    info = _messages(caplog, "vmpilot.machine", logging.INFO)
    me = f"life (pid {pid})"
    expected = [
        "life: accel tcg (asked for in the config)",
        f"{me}: launched: qemu-system-x86_64 -nodefaults",
        f"{me}: ready (QMP negotiated)",
        f"{me}: shutting down (quit, 30 s)",
        f"{me}: QEMU ended (exit status 0); cleaning up",
    ]
    mine = [m for m in info if m.startswith("life")]
    assert len(mine) == len(expected), mine
    for line, start in zip(mine, expected, strict=True):
        assert line.startswith(start), (line, start)
    killed = [m for m in info if m.startswith("killed (pid")]
    assert [m.split(": ", 1)[1] for m in killed[-3:]] == [
        "kill() called", "killing QEMU (SIGKILL)", "QEMU ended (killed by SIGKILL); cleaning up",
    ]  # fmt: skip
    assert not _messages(caplog, "vmpilot.qmp", logging.DEBUG)  # not enabled: not logged


def test_async_traffic_is_logged_too(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vmpilot.qmp")

    async def main() -> Any:
        async with AsyncMachine(machine="none", memory=32, accel="tcg", qemu=QEMU) as vm:
            await vm.execute("query-status")
            return vm.pid

    pid = run_async(main())
    traffic = _messages(caplog, "vmpilot.qmp", logging.DEBUG)
    assert f'QEMU pid {pid} -> {{"execute":"query-status","id":2}}' in traffic
    assert any(m.startswith(f"QEMU pid {pid} <- Reply(id=2, value={{'status'") for m in traffic)


def test_disabled_traffic_logging_formats_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """With DEBUG off, no message text is built (the guard is checked first)."""
    built: list[Any] = []
    logging.getLogger("vmpilot").setLevel(logging.INFO)
    try:
        from vmpilot.qmp import _client

        monkeypatch.setattr(
            _client.ClientBase, "_log_received", lambda self, items: built.append(items)
        )
        with Machine(machine="none", memory=32, accel="tcg", qemu=QEMU) as vm:
            vm.execute("query-status")
    finally:
        logging.getLogger("vmpilot").setLevel(logging.NOTSET)
    assert built == []


def test_failing_test_report_has_the_vmpilot_log(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_fails(qmp_vm):
            qmp_vm.execute("query-status")
            assert False, "boom"

        def test_passes(qmp_vm):
            qmp_vm.execute("query-status")
        """
    )
    args = ["-p", "no:cacheprovider", f"--vmpilot-qemu={QEMU}", "--vmpilot-accel=tcg"]
    result = pytester.runpytest_subprocess(*args, "--vmpilot-log-level=DEBUG")
    result.assert_outcomes(failed=1, passed=1)
    out = result.stdout.str()
    assert out.count("vmpilot log (last 200 lines at most)") == 1  # the failing test only
    result.stdout.fnmatch_lines(
        [
            "*vmpilot log (last 200 lines at most)*",
            "*vmpilot.machine INFO QEMU pid * ready (QMP negotiated)*",
            '*vmpilot.qmp DEBUG QEMU pid * -> {"execute":"query-status","id":2}*',
        ]
    )
    bad = pytester.runpytest_subprocess(*args, "--vmpilot-log-level=LOUD")
    assert "no such level 'LOUD'" in bad.stderr.str()
