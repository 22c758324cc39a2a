"""Shared fixtures, and the session-wide guard: a run that leaves a QEMU
process, an open fd or a vmpilot temp dir behind fails."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

pytest_plugins = ["pytester"]

QEMU = os.environ.get("VMPILOT_QEMU") or shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
QEMU_NONE = [QEMU, "-machine", "none", "-nodefaults", "-display", "none", "-no-user-config"]


def pytest_report_header(config: pytest.Config) -> str:
    """Which QEMU this run tests (CI runs the suite against more than one)."""
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=30)
        version = out.stdout.splitlines()[0] if out.stdout else out.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        version = f"cannot run it: {exc}"
    return f"QEMU: {QEMU}: {version}"


# -- the leak guard -------------------------------------------------------
# It counts only what this run made: QEMU processes that carry this run's
# token in their environment (inherited from us, so orphans are found too),
# our own fds, and vmpilot temp dirs in a temp root private to this run.
# It never looks at, let alone signals, a process some other program started.

TOKEN_VAR = "VMPILOT_TEST_SESSION"


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd of the listdir itself
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def _environ(pid: str) -> bytes:
    """/proc/PID/environ. A process still inside exec() (its new program
    mapped, its stack not yet) shows an empty one for a few microseconds, and
    `Popen` may already have returned then: read again, for at most a second.
    No fd or event says "exec done", hence the bounded re-read."""
    import time

    end = time.monotonic() + 1.0
    while True:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
        if data or time.monotonic() > end:
            return data
        time.sleep(0.001)


def _our_qemu_pids(token: str) -> set[int]:
    """QEMU processes started by this test run (they inherit the token)."""
    needle = f"{TOKEN_VAR}={token}".encode()
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            # the exe link, not comm: comm changes later in exec(), after Popen returned
            if not os.path.basename(os.readlink(f"/proc/{entry}/exe")).startswith("qemu-system"):
                continue
            if needle in _environ(entry).split(b"\0"):
                pids.add(int(entry))
        except OSError:  # gone, or not ours to read
            pass
    return pids


def _vmpilot_tmp(root: str) -> set[str]:
    return {n for n in os.listdir(root) if n.startswith("vmpilot-")}


_baseline: dict[str, Any] = {}


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # xdist workers inherit the controller's run
        return
    import uuid

    # pytest's own tmp_path dirs stay where they always are
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    root = tempfile.mkdtemp(prefix="vmpilot_testrun_")
    os.environ["TMPDIR"] = root
    tempfile.tempdir = root
    token = uuid.uuid4().hex
    os.environ[TOKEN_VAR] = token
    _baseline.update(root=root, token=token)


def pytest_sessionstart(session: pytest.Session) -> None:
    if _baseline:
        _baseline.update(fds=_open_fds())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if "fds" not in _baseline or hasattr(session.config, "workerinput"):
        return
    problems = []
    qemu = _our_qemu_pids(_baseline["token"])
    if qemu:
        problems.append(f"QEMU processes left running: {sorted(qemu)}")
        for pid in qemu:  # ours (they carry our token): do not let them outlive the run
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
    fds = _open_fds()
    extra = {fd: target for fd, target in fds.items() if fd not in _baseline["fds"]}
    if extra:
        problems.append(f"file descriptors left open: {extra}")
    tmp = _vmpilot_tmp(_baseline["root"])
    if tmp:
        problems.append(f"temp dirs left behind: {sorted(tmp)}")
    shutil.rmtree(_baseline["root"], ignore_errors=True)
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = "LEAK GUARD FAILED:\n  " + "\n  ".join(problems)
        if reporter is not None:
            reporter.write_line(text, red=True)
        else:
            print(text)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# -- raw QEMU for protocol tests (no Machine layer involved) --------------


class RawQemu:
    """`qemu-system-x86_64 -machine none` with QMP on a socketpair; the test
    gets our end as `sock`. Killed and reaped at teardown whatever happened."""

    def __init__(self, extra: list[str] | None = None, *, first: bool = False) -> None:
        ours, theirs = socket.socketpair()
        mon = [
            "-chardev",
            f"socket,id=qmp,fd={theirs.fileno()}",
            "-mon",
            "chardev=qmp,mode=control",
        ]
        extra = extra or []
        self.argv = [*QEMU_NONE, *(extra + mon if first else mon + extra)]
        self.proc = subprocess.Popen(
            self.argv,
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        theirs.close()
        self.sock: socket.socket | None = ours
        self.qmp: Any = None

    def take_socket(self) -> socket.socket:
        sock, self.sock = self.sock, None
        assert sock is not None
        return sock

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def raw_qemu() -> Iterator[RawQemu]:
    q = RawQemu()
    try:
        yield q
    finally:
        q.stop()


@pytest.fixture
def qemu_unix(tmp_path: Any) -> Iterator[tuple[RawQemu, str]]:
    """QEMU listening on a unix socket path (the way users start it by hand)."""
    path = str(tmp_path / "qmp.sock")
    # -qmp comes first on the command line: once the socketpair monitor (set
    # up after it) greets us, the listening socket exists. No polling.
    # The socketpair monitor stays usable as `q.qmp` (a QMPClient).
    from vmpilot.qmp import QMPClient

    q = RawQemu(["-qmp", f"unix:{path},server=on,wait=off"], first=True)
    try:
        q.qmp = QMPClient.connect(q.take_socket())
        assert os.path.exists(path)
        yield q, path
    finally:
        if q.qmp is not None:
            q.qmp.close()
        q.stop()


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run that also fails on any exception the loop reports as
    never retrieved (the qemu.qmp flaw we promise not to have)."""
    reported: list[dict[str, Any]] = []

    async def main() -> Any:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx))
        return await coro

    result = asyncio.run(main())
    assert not reported, f"the event loop reported: {reported}"
    return result


def wait_until(predicate: Any, timeout: float = 5.0, what: str = "condition") -> None:
    """Spin (yielding the GIL) until `predicate()`; only for a thread entering a
    blocking call, where nothing else can be waited on. Bounded."""
    import time

    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0)


@pytest.fixture(scope="session")
def linux_guest(request: pytest.FixtureRequest) -> Any:
    """The bundled Linux guest, built (or reused from the cache) once per run;
    the time it took is printed (CI shows the first build's)."""
    import time

    from vmpilot import guest

    t0 = time.monotonic()
    image = guest.default()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"\nbundled guest {image.kernel_release} ready in {time.monotonic() - t0:.1f} s "
            f"({image.path})"
        )
    return image
