"""`vmpilot run --qmp PATH`: `vmpilot events` and `vmpilot qmp` attached at the
same time (the issue's failing scenario: QEMU's socket took one client)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pexpect
from conftest import QEMU

VMPILOT = [sys.executable, "-m", "vmpilot"]
ENV = {**os.environ, "TERM": "xterm", "VMPILOT_QEMU": QEMU}


def test_run_serves_events_and_qmp_together(linux_guest: object, tmp_path: Path) -> None:
    path = str(tmp_path / "vm.qmp")
    run = pexpect.spawn(VMPILOT[0], [*VMPILOT[1:], "run", "--qmp", path], timeout=120,
                        encoding="utf-8", env=ENV, dimensions=(40, 200))  # fmt: skip
    try:
        run.expect(r"QMP: (\S+)")
        assert run.match.group(1) == path
        events = subprocess.Popen(
            [*VMPILOT, "events", path, "--name", "STOP", "--name", "RESUME", "--count", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        )  # fmt: skip
        try:
            assert events.stderr is not None
            assert "waiting for events" in events.stderr.readline()
            r = subprocess.run(
                [*VMPILOT, "qmp", path, "-c", "stop", "-c", "query-status", "-c", "cont"],
                capture_output=True, text=True, timeout=120, env=ENV,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert '"status": "paused"' in r.stdout
            out, err = events.communicate(timeout=60)
            assert events.returncode == 0, err
            assert [json.loads(line)["event"] for line in out.splitlines()] == ["STOP", "RESUME"]
        finally:
            if events.poll() is None:
                events.kill()
                events.communicate()
        run.expect("guest# ")
        run.send("\x1dq")  # Ctrl-] q: graceful shutdown
        run.expect("shut down \\(powerdown\\), exit code 0")
        run.expect(pexpect.EOF)
    finally:
        run.close(force=True)
    assert run.exitstatus == 0
    assert not os.path.exists(path)  # served until the VM's cleanup
