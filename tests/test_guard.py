"""The session guard (conftest.py) on a shared machine: it reports and kills
the QEMUs its own run leaked, and never touches one it did not start, even
one that appeared while the run was going.

Each test runs a small inner pytest session whose conftest is a copy of ours,
in a subprocess, and checks what happened to the QEMUs around it.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import QEMU_NONE, TOKEN_VAR

from vmpilot.qmp import QMPClient

HERE = Path(__file__).parent
DEADLINE = 120.0  # s, for an inner session (a few seconds when the machine is idle)

WAITS_FOR_THE_OUTER_TEST = """
import os, select

def test_leaks_nothing_but_waits_while_the_outer_test_starts_a_qemu():
    os.write(int(os.environ["GUARD_READY_FD"]), b"r")
    go = int(os.environ["GUARD_GO_FD"])
    readable, _, _ = select.select([go], [], [], 120)
    assert readable and os.read(go, 1) == b"g"
"""

LEAKS_ITS_OWN_QEMU = """
import os, subprocess
from conftest import QEMU_NONE

leaked = []

def test_leaks_a_qemu():
    proc = subprocess.Popen(QEMU_NONE, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    leaked.append(proc)  # no ResourceWarning: it lives until the guard finds it
    with open(os.environ["GUARD_PID_FILE"], "w") as f:
        f.write(str(proc.pid))
"""

LEAKS_AN_ORPHAN = """
import os, subprocess, sys
from conftest import QEMU_NONE

# a short-lived parent starts QEMU (Popen returns once it is exec'ing) and exits
PARENT = (
    "import subprocess, sys; d = subprocess.DEVNULL; "
    "print(subprocess.Popen(sys.argv[1:], stdin=d, stdout=d, stderr=d).pid)"
)

def test_leaks_a_qemu_whose_parent_is_gone():
    out = subprocess.run([sys.executable, "-c", PARENT, *QEMU_NONE],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    with open(os.environ["GUARD_PID_FILE"], "w") as f:
        f.write(out.strip())
"""


def inner_session(tmp_path: Path, test_source: str) -> Path:
    """A directory holding a copy of the guard's conftest and one test file."""
    root = tmp_path / "inner"
    root.mkdir()
    (root / "pytest.ini").write_text("[pytest]\n")  # its own rootdir: our pyproject stays out
    (root / "conftest.py").write_text((HERE / "conftest.py").read_text())
    (root / "test_inner.py").write_text(textwrap.dedent(test_source))
    return root


def start_pytest(
    root: Path, env: dict[str, str], pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:vmpilot"],
        cwd=root,
        env={**os.environ, **env},
        pass_fds=pass_fds,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


class Started:
    """QEMUs this test starts itself, each with QMP on a socketpair; killed
    and reaped at teardown."""

    def __init__(self) -> None:
        self.procs: list[tuple[subprocess.Popen[bytes], socket.socket]] = []

    def qemu(self, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], socket.socket]:
        ours, theirs = socket.socketpair()
        with theirs:
            monitor = [
                "-chardev",
                f"socket,id=qmp,fd={theirs.fileno()}",
                "-mon",
                "chardev=qmp,mode=control",
            ]
            proc = subprocess.Popen(
                [*QEMU_NONE, *monitor],
                env=env,
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        self.procs.append((proc, ours))
        return proc, ours


@pytest.fixture
def started() -> Iterator[Started]:
    s = Started()
    yield s
    for proc, sock in s.procs:
        sock.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("whose", ["another program's (no token)", "the outer run's (our token)"])
def test_a_qemu_the_session_did_not_start_survives_it(
    tmp_path: Path, started: Started, whose: str
) -> None:
    root = inner_session(tmp_path, WAITS_FOR_THE_OUTER_TEST)
    if whose.startswith("another"):
        qemu_env = {k: v for k, v in os.environ.items() if k != TOKEN_VAR}
    else:
        qemu_env = dict(os.environ)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    try:
        env = {"GUARD_READY_FD": str(ready_w), "GUARD_GO_FD": str(go_r)}
        inner = start_pytest(root, env, pass_fds=(ready_w, go_r))
        os.close(ready_w)
        os.close(go_r)
        try:
            # the inner session is running its test: a QEMU appears that is not its own
            readable, _, _ = select.select([ready_r], [], [], DEADLINE)
            assert readable and os.read(ready_r, 1) == b"r", "the inner test never started"
            foreign, sock = started.qemu(qemu_env)
            os.write(go_w, b"g")
            out, _ = inner.communicate(timeout=DEADLINE)
        finally:
            if inner.poll() is None:
                inner.kill()
                inner.communicate(timeout=10)
    finally:
        for fd in (ready_r, go_w):
            os.close(fd)
    assert inner.returncode == 0, out
    assert "LEAK GUARD" not in out
    # It still answers: a process the guard had SIGKILLed could not (once the
    # inner session has exited, its kill() has returned: the signal is pending).
    with QMPClient.connect(sock.dup(), timeout=30) as qmp:
        assert "status" in qmp.execute("query-status"), out
    assert foreign.poll() is None, out


def _state(pid: int) -> str:
    """The process state letter (R, S, Z, ...), or "" once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return ""


@pytest.mark.parametrize("source", [LEAKS_ITS_OWN_QEMU, LEAKS_AN_ORPHAN], ids=["child", "orphan"])
def test_a_qemu_the_session_leaked_is_reported_and_killed(tmp_path: Path, source: str) -> None:
    root = inner_session(tmp_path, source)
    pid_file = tmp_path / "leaked.pid"
    inner = start_pytest(root, {"GUARD_PID_FILE": str(pid_file)})
    try:
        out, _ = inner.communicate(timeout=DEADLINE)
    finally:
        if inner.poll() is None:
            inner.kill()
            inner.communicate(timeout=10)
    pid = int(pid_file.read_text())
    try:
        assert inner.returncode == pytest.ExitCode.TESTS_FAILED, out
        assert f"LEAK GUARD FAILED:\n  QEMU processes left running: [{pid}]" in out
        # SIGKILLed by the guard: gone, or a zombie waiting for init to reap it
        assert _state(pid) in ("", "Z", "X"), out
    finally:
        if _state(pid) not in ("", "Z", "X"):  # the guard failed: ours (started by our inner run)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[0] == QEMU_NONE[0].encode():
                    os.kill(pid, 9)
