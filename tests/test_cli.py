"""The `vmpilot` command, end to end, as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from conftest import QEMU


def vmpilot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmpilot", *args], capture_output=True, text=True, timeout=300
    )


def test_demo_boots_the_bundled_guest_and_reports_phases(linux_guest: object) -> None:
    r = vmpilot("demo", "--qemu", QEMU)
    assert r.returncode == 0, r.stderr
    for text in (
        "guest$ uname -a  (exit status 0)",
        "Linux (none) ",
        "query-status: {",
        "query-cpus-fast: 1 vCPU(s)",
        "powered off: exit code 0",
        "boot to the shell prompt",
    ):
        assert text in r.stdout
    assert "⠋" not in r.stderr  # no progress animation when not on a terminal


def test_error_is_one_line_and_exit_status_1() -> None:
    r = vmpilot("demo", "--qemu", "/no/such/qemu")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vmpilot: error: QEMU binary")
    assert "Traceback" not in r.stderr


def test_help_and_version() -> None:
    assert vmpilot("--help").returncode == 0
    assert "demo" in vmpilot("demo", "--help").stdout
    assert vmpilot("--version").stdout.startswith("vmpilot ")
    bare = vmpilot()  # exit status 2 *and* argparse's usage: not any early failure
    assert bare.returncode == 2 and bare.stdout.startswith("usage: vmpilot"), bare.stderr
