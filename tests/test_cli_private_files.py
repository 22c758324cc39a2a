"""What `vmpilot qmp` writes holds everything typed (secrets too): the
history and the `--log` transcript are 0600, the state directory 0700,
whatever the umask, and wider modes left from older versions are dealt with."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from conftest import RawQemu
from test_cli_interactive import ENV, VMPILOT, cli, on_screen


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The umask most users have (files 0644 unless the code says otherwise)."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_new_transcript_is_private(qemu_unix: tuple[RawQemu, str], tmp_path: Path) -> None:
    _, path = qemu_unix
    log = tmp_path / "t.jsonl"
    r = cli("qmp", path, "--log", str(log), "-c", "human-monitor-command command-line=secret")
    assert r.returncode == 0, r.stderr
    assert "secret" in log.read_text() and mode(log) == 0o600
    assert "warning" not in r.stderr


def test_an_existing_readable_transcript_is_kept_but_warned_about(
    qemu_unix: tuple[RawQemu, str], tmp_path: Path
) -> None:
    _, path = qemu_unix
    log = tmp_path / "shared.jsonl"
    log.write_text("")
    log.chmod(0o644)
    r = cli("qmp", path, "--log", str(log), "-c", "query-status")
    assert r.returncode == 0, r.stderr
    assert f"vmpilot: warning: {log} has mode 0644: others can read the transcript" in r.stderr
    assert mode(log) == 0o644  # the user's file: told, not changed


@pytest.mark.parametrize("prompt", ["prompt_toolkit", "readline"])
@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "left-wide-by-older-versions"])
def test_history_and_state_dir_are_private(
    qemu_unix: tuple[RawQemu, str], tmp_path: Path, existing: bool, prompt: str
) -> None:
    _, path = qemu_unix
    state = tmp_path / "vmpilot"
    history = state / "qmp-history"
    if existing:
        state.mkdir()
        state.chmod(0o755)
        history.write_text("query-name\n")
        history.chmod(0o644)
    env = {**ENV, "XDG_STATE_HOME": str(tmp_path)}
    if prompt == "readline":
        env["VMPILOT_PLAIN_PROMPT"] = "1"
    shell = pexpect.spawn(
        VMPILOT[0], [*VMPILOT[1:], "qmp", path], timeout=60, encoding="utf-8", env=env,
        dimensions=(40, 200),
    )  # fmt: skip
    try:
        shell.expect(on_screen("(QEMU)"))
        shell.send("query-status\r")
        shell.expect('"status": "running"')
        shell.expect(on_screen("(QEMU)"))
        shell.sendeof()
        shell.expect(pexpect.EOF)
    finally:
        shell.close(force=True)
    assert shell.exitstatus == 0
    assert "query-status" in history.read_text()
    assert (mode(state), mode(history)) == (0o700, 0o600)
