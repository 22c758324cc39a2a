"""The fleet (`--vmpilot-hosts`) against this machine reached over loopback
ssh: a private sshd on 127.0.0.1 with its own host key, authorized key and
config in a temp dir (the system's ssh configuration is never read or
touched), named `fleet-test` in a private ssh config, beside `local`."""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
HOST = "fleet-test"
RUN_TIMEOUT = 240


def _descendants(pid: int) -> list[int]:
    """Processes below `pid` (children first), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


class PrivateSshd:
    """An sshd of our own on 127.0.0.1 at a free port, and an ssh config
    naming it `fleet-test`. Its sessions carry the test run's token and TMPDIR
    (sshd's SetEnv), so the session's leak guard sees their QEMUs too."""

    def __init__(self, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        for key in ("host_key", "id_ed25519"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)],
                check=True,
                timeout=30,
            )
        (d / "authorized_keys").write_text((d / "id_ed25519.pub").read_text())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = " ".join(
            f"{k}={os.environ[k]}" for k in ("VMPILOT_TEST_SESSION", "TMPDIR") if k in os.environ
        )
        (d / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1:{self.port}\n"
            f"HostKey {d}/host_key\n"
            f"AuthorizedKeysFile {d}/authorized_keys\n"
            "PidFile none\nUsePAM no\nStrictModes no\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n" + (f"SetEnv {env}\n" if env else "")
        )
        self.ssh_config = d / "ssh_config"
        self.ssh_config.write_text(
            f"Host {HOST}\n  HostName 127.0.0.1\n  Port {self.port}\n  User {getpass.getuser()}\n"
            f"  IdentityFile {d}/id_ed25519\n  IdentitiesOnly yes\n"
            f"  HostKeyAlias {HOST}\n  UserKnownHostsFile {d}/known_hosts\n"
            "  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n  LogLevel ERROR\n"
        )
        (d / "known_hosts").write_text(f"{HOST} {(d / 'host_key.pub').read_text()}")
        if os.geteuid() == 0:  # sshd's compiled-in privilege separation dir
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        listening = threading.Event()

        def drain() -> None:  # sshd logs to stderr; never let the pipe fill
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                if "Server listening" in line:
                    listening.set()
            listening.set()

        self._drain = threading.Thread(target=drain, daemon=True)
        self._drain.start()
        listening.wait(30)
        if self.proc.poll() is not None or not any("Server listening" in x for x in self.log):
            self.stop()
            raise RuntimeError("private sshd did not start:\n" + "".join(self.log))

    def kill(self) -> None:
        """The host goes away: sshd and every sshd session process it forked
        (the commands they run are left to notice on their own)."""
        sessions = [p for p in _descendants(self.proc.pid) if _comm(p) == "sshd"]
        self.proc.kill()
        for pid in sessions:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.proc.wait(10)
        self._drain.join(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


def _sshd_or_skip(d: Path) -> PrivateSshd:
    if not os.access(SSHD, os.X_OK) or shutil.which("ssh") is None:
        pytest.skip(f"{SSHD} or ssh is not installed (./dev test installs openssh-server)")
    return PrivateSshd(d)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateSshd]:
    server = _sshd_or_skip(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


def _fleet_args(server: PrivateSshd, *extra: str) -> list[str]:
    return [
        f"--vmpilot-hosts={HOST},local",
        f"--vmpilot-ssh-config={server.ssh_config}",
        "--vmpilot-workers-per-host=1",
        "-p",
        "no:cacheprovider",
        *extra,
    ]


SUITE = """
import os
import pytest
from vmpilot import guest

@pytest.mark.parametrize("i", range(2))
def test_qmp(qmp_vm, vmpilot_host, i):
    assert qmp_vm.execute("query-status")["running"]
    if vmpilot_host == "fleet-test":  # really over there: in the host's copy
        assert "/vmpilot/fleet/runs/" in os.getcwd()

def test_console_fails(vm_factory, tmp_path, vmpilot_host):
    vm = vm_factory(guest.tiny.config(guest.tiny.write(str(tmp_path))))
    try:
        vm.console.expect(guest.tiny.READY, timeout=60)
        assert False, "deliberate failure"
    finally:
        vm.shutdown()
"""


def test_fleet_runs_on_both_hosts_and_reports_the_host(
    sshd: PrivateSshd, pytester: pytest.Pytester, tmp_path: Path
) -> None:
    pytester.makepyfile(test_suite=SUITE)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    logs = tmp_path / "logs"
    t0 = time.monotonic()
    result = pytester.runpytest_subprocess(
        *_fleet_args(sshd, "--dist=each", f"--vmpilot-keep-logs={logs}"), timeout=RUN_TIMEOUT
    )
    took = time.monotonic() - t0
    out = result.stdout.str()
    print(out[-6000:], f"\nfleet run took {took:.1f} s")
    result.assert_outcomes(passed=4, failed=2)  # every test on each host
    assert f"vmpilot fleet: {HOST} ready in" in out
    # the failure's report names the host and carries the console tail
    assert f"ran on host {HOST} (worker gw" in out
    assert "ran on host local (worker gw" in out
    vm = rf"vmpilot VM on {HOST}: 0 \(pid \d+, stopped\)"
    assert re.search(vm + r": console \(tail\) -+\nTINY-GUEST READY", out)
    # its log paths are on that host: they say so
    assert re.search(vm + rf": full logs -+\n{HOST}:/\S+/logs/test_console_fails/vm-", out)
    # keep-logs collected every VM's logs from both hosts
    for host in (HOST, "local"):
        (console,) = (logs / host / "test_console_fails").glob("vm-*/console.log")
        assert "TINY-GUEST READY" in console.read_text(), host
        kept = sorted(p.name for p in (logs / host).iterdir())
        assert kept == ["test_console_fails", "test_qmp_0_", "test_qmp_1_"], (host, kept)


DEATH_SUITE = """
import os
import pytest

@pytest.mark.parametrize("i", range(6))
def test_t(qmp_vm, vmpilot_host, i):
    if vmpilot_host == "fleet-test":  # say where we are, then wait for the end
        with open({fifo!r}, "w") as f:
            f.write(f"{{os.getpid()}} {{qmp_vm.pid}} {{os.getcwd()}}\\n")
        qmp_vm.wait(timeout=120)
"""


def _wait_gone(pid: int, timeout: float) -> bool:
    """True once process `pid` has ended (its pidfd turns readable)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def test_a_host_that_dies_fails_only_its_tests(pytester: pytest.Pytester, tmp_path: Path) -> None:
    server = _sshd_or_skip(tmp_path / "sshd")
    fifo = tmp_path / "running"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        pytester.makepyfile(test_dies=DEATH_SUITE.format(fifo=str(fifo)))
        pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
        proc = pytester.popen(
            [sys.executable, "-m", "pytest", *_fleet_args(server)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            # a test is running on the ssh host: it says so through the fifo
            assert select.select([rfd], [], [], RUN_TIMEOUT)[0], "nothing ran on the ssh host"
            line = b""
            while not line.endswith(b"\n"):
                assert select.select([rfd], [], [], 30)[0]
                line += os.read(rfd, 1000)
            worker, qemu, cwd = line.decode().split()
            server.kill()  # the host goes away mid-test
            out = proc.communicate(timeout=RUN_TIMEOUT)[0].decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        print(out[-5000:])
        assert proc.returncode == 1
        assert re.search(
            rf"FAILED test_dies.py::test_t\[\d\] - host {HOST} went down while running", out
        ), out[-3000:]
        assert "1 failed, 5 passed" in out  # its queued tests ran on `local`
        # what ran on the host ends by itself once its connection is gone
        assert _wait_gone(int(worker), 60), "the worker on the dead host is still running"
        assert _wait_gone(int(qemu), 30), "the QEMU on the dead host is still running"
    finally:
        os.close(rfd)
        server.stop()
    run_dir = Path(cwd).parent  # the dead host's copy of the run: ours, remove it
    assert "/vmpilot/fleet/runs/" in str(run_dir)
    shutil.rmtree(run_dir)
