"""The interactive front doors, driven through a pseudo-terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from conftest import QEMU, RawQemu

VMPILOT = [sys.executable, "-m", "vmpilot"]
ENV = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm", "VMPILOT_QEMU": QEMU}


class Terminals:
    """pexpect children on pseudo-terminals, all closed at teardown (even when a test fails)."""

    def __init__(self) -> None:
        self.children: list[pexpect.spawn] = []

    def __call__(self, *args: str, **env: str) -> pexpect.spawn:
        child = pexpect.spawn(
            VMPILOT[0], [*VMPILOT[1:], *args], timeout=60, encoding="utf-8",
            env={**ENV, **env}, dimensions=(40, 200),
        )  # fmt: skip
        self.children.append(child)
        return child


@pytest.fixture
def spawn() -> Iterator[Terminals]:
    terms = Terminals()
    yield terms
    for child in terms.children:
        child.close(force=True)


def on_screen(text: str) -> re.Pattern[str]:
    """`text` as prompt_toolkit draws it: its diff renderer puts escape codes between letters and
    may draw a space as a cursor move."""
    gap = "(?:\x1b\\[[0-9;?]*[A-Za-z]| )*"
    return re.compile(gap.join(re.escape(c) for c in text if c != " "))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VMPILOT, *args], capture_output=True, text=True, timeout=120, env=ENV)


def test_qmp_one_shot_json_hmp_and_errors(qemu_unix: tuple[RawQemu, str], tmp_path: Path) -> None:
    _, path = qemu_unix
    log = tmp_path / "t.jsonl"
    r = cli("qmp", path, "--log", str(log), "-c", "query-status", "-c", '{"execute": "query-name"}')
    assert r.returncode == 0, r.stderr
    assert '"running": true' in r.stdout and "{}" in r.stdout
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines[0]["command"] == {"execute": "query-status", "arguments": None}
    assert lines[1]["return"]["status"] == "running"
    r = cli("qmp", path, "--hmp", "-c", "info status")
    assert (r.returncode, r.stdout.strip()) == (0, "VM status: running")
    r = cli("qmp", path, "-c", "device_del id=nope")
    assert r.returncode == 1 and "error: DeviceNotFound: Device 'nope' not found" in r.stdout
    r = cli("qmp", path, "-c", "device_del id")
    assert r.returncode == 1 and "expected key=value" in r.stdout
    r = cli("qmp", path + ".nope", "-c", "query-status")
    assert r.returncode == 1 and r.stderr.startswith("vmpilot: error: cannot connect")


def test_qmp_shell_completion_events_history(
    qemu_unix: tuple[RawQemu, str], tmp_path: Path, spawn: Terminals
) -> None:
    _, path = qemu_unix
    shell = spawn("qmp", path, XDG_STATE_HOME=str(tmp_path))
    prompt = on_screen("(QEMU)")
    shell.expect(r"Connected to QEMU \d+\.\d+")
    shell.expect(prompt)
    shell.send("query-statu\t")  # completes from the live schema
    shell.expect(on_screen("query-status"))
    shell.send("\r")
    shell.expect('"running": true')
    shell.expect(prompt)  # keys go in at a prompt, as a person types them
    shell.send("stop\r")
    shell.expect('"event": "STOP"')  # printed as it arrives
    shell.expect(prompt)
    shell.send("device_del i\t")  # argument names complete too
    shell.expect(on_screen("device_del id="))
    shell.send("x\r")
    shell.expect("DeviceNotFound")
    shell.expect(prompt)
    shell.send("cont\r")
    shell.expect('"event": "RESUME"')
    shell.expect(prompt)  # ^D typed before the prompt reaches the shell as a NUL, not as EOF
    shell.sendeof()
    shell.expect(pexpect.EOF)
    shell.close()
    assert shell.exitstatus == 0
    history = (tmp_path / "vmpilot" / "qmp-history").read_text()
    assert "query-status" in history and "device_del id=x" in history


def test_qmp_plain_prompt_without_prompt_toolkit(
    qemu_unix: tuple[RawQemu, str], spawn: Terminals, tmp_path: Path
) -> None:
    _, path = qemu_unix
    shell = spawn("qmp", path, VMPILOT_PLAIN_PROMPT="1", XDG_STATE_HOME=str(tmp_path))
    shell.expect_exact("(QEMU) ")
    shell.send('{"execute": "query-status"}\r')
    shell.expect('"status": "running"')
    shell.expect_exact("(QEMU) ")  # ^D at the prompt: typed earlier, readline reads a NUL
    shell.sendeof()
    shell.expect(pexpect.EOF)


def test_events_tail_as_json_lines(qemu_unix: tuple[RawQemu, str]) -> None:
    q, path = qemu_unix
    tail = subprocess.Popen(
        [*VMPILOT, "events", path, "--name", "RESUME", "--count", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    assert tail.stdout is not None and tail.stderr is not None
    assert "waiting for events" in tail.stderr.readline()  # connected and negotiated
    q.qmp.execute("stop")  # the other monitor drives QEMU
    q.qmp.execute("cont")
    out, _ = tail.communicate(timeout=30)
    assert tail.returncode == 0
    [event] = [json.loads(line) for line in out.splitlines()]
    assert event["event"] == "RESUME" and event["timestamp"] > 1e9


def test_guest_path_and_build(linux_guest: object) -> None:
    r = cli("guest", "path", "kernel")
    assert r.returncode == 0 and r.stdout.strip().endswith("vmlinuz")
    r = cli("guest", "build")
    assert r.returncode == 0 and " (Linux 6." in r.stdout
    assert cli("guest").returncode == 2  # an action is required


def test_run_console_on_terminal_then_graceful_quit(linux_guest: object, spawn: Terminals) -> None:
    run = spawn("run")
    run.expect(r"QMP: (\S+)")
    path = run.match.group(1)
    run.expect("guest# ")
    run.send("echo $((6*7))\r")
    run.expect("42")
    r = cli("qmp", path, "-c", "query-status")  # the exposed socket works for other tools
    assert r.returncode == 0 and '"running": true' in r.stdout
    run.send("\x1dq")  # Ctrl-] q
    run.expect("shut down \\(powerdown\\), exit code 0")
    run.expect(pexpect.EOF)
    run.close()
    assert run.exitstatus == 0
    assert not Path(path).exists()


def test_run_errors_are_one_line() -> None:
    r = cli("run", "--kernel", "/no/such/kernel")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "kernel file '/no/such/kernel' does not exist" in r.stderr


@pytest.mark.parametrize("flag", ["--help"])
def test_every_command_has_help(flag: str) -> None:
    for cmd in (["demo"], ["run"], ["qmp"], ["qga"], ["events"], ["guest"], ["guest", "build"]):
        r = cli(*cmd, flag)
        assert r.returncode == 0 and "usage: vmpilot" in r.stdout, cmd


def test_demo_shows_progress_on_a_terminal(linux_guest: object, spawn: Terminals) -> None:
    demo = spawn("demo")
    demo.expect("✓ guest build")
    demo.expect("✓ boot to the shell prompt")
    demo.expect("powered off: exit code 0")
    demo.expect(pexpect.EOF)
    demo.close()
    assert demo.exitstatus == 0


def test_run_without_a_terminal_quits_at_end_of_input(linux_guest: object) -> None:
    # a pipe, not a tty: input is forwarded as it comes; EOF means quit
    proc = subprocess.Popen(
        [*VMPILOT, "run"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=ENV,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    seen = b""
    while b"guest# " not in seen:  # the console, mirrored on stdout
        chunk = proc.stdout.read1(4096)
        assert chunk, "run ended before the prompt"
        seen += chunk
    proc.stdin.write(b"echo piped-$((6*7))\n")
    proc.stdin.flush()
    while b"piped-42" not in seen:
        chunk = proc.stdout.read1(4096)
        assert chunk, "run ended before the answer"
        seen += chunk
    _out, err = proc.communicate(timeout=60)  # closes stdin: end of input, graceful shutdown
    assert proc.returncode == 0, err
    assert b"end of input quits" in err and b"shut down (powerdown), exit code 0" in err
