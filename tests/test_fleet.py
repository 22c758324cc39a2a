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


class HostRun:
    """An inner fleet run whose tests, on the ssh host, say where they are
    through a fifo and then wait for the end (of the host or the run)."""

    def __init__(self, pytester: pytest.Pytester, server: PrivateSshd, fifo: Path) -> None:
        os.mkfifo(fifo)
        self.rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        pytester.makepyfile(test_dies=DEATH_SUITE.format(fifo=str(fifo)))
        pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
        self.proc = pytester.popen(
            [sys.executable, "-m", "pytest", *_fleet_args(server)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def wait_running_on_host(self) -> tuple[int, int, Path]:
        """(worker pid, QEMU pid, cwd) of the test running on the ssh host."""
        assert select.select([self.rfd], [], [], RUN_TIMEOUT)[0], "nothing ran on the ssh host"
        line = b""
        while not line.endswith(b"\n"):
            assert select.select([self.rfd], [], [], 30)[0]
            line += os.read(self.rfd, 1000)
        worker, qemu, cwd = line.decode().split()
        return int(worker), int(qemu), Path(cwd)

    def close(self) -> str:
        try:
            out = self.proc.communicate(timeout=RUN_TIMEOUT)[0].decode()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
            os.close(self.rfd)
        print(out[-5000:])
        return out


def _remove_run_dir(cwd: Path) -> None:
    """The host's copy of an inner run that could not clean up: ours."""
    run_dir = cwd.parent
    assert "/vmpilot/fleet/runs/" in str(run_dir)
    shutil.rmtree(run_dir)


def test_a_host_that_dies_fails_only_its_tests(pytester: pytest.Pytester, tmp_path: Path) -> None:
    server = _sshd_or_skip(tmp_path / "sshd")
    try:
        run = HostRun(pytester, server, tmp_path / "running")
        try:
            worker, qemu, cwd = run.wait_running_on_host()
            server.kill()  # the host goes away mid-test
        finally:
            out = run.close()
        assert run.proc.returncode == 1
        assert re.search(
            rf"FAILED test_dies.py::test_t\[\d\] - host {HOST} went down while running", out
        ), out[-3000:]
        assert "1 failed, 5 passed" in out  # its queued tests ran on `local`
        # what ran on the host ends by itself once its connection is gone
        assert _wait_gone(worker, 60), "the worker on the dead host is still running"
        assert _wait_gone(qemu, 30), "the QEMU on the dead host is still running"
    finally:
        server.stop()
    _remove_run_dir(cwd)


def test_nothing_runs_on_any_host_once_the_controller_is_killed(
    sshd: PrivateSshd, pytester: pytest.Pytester, tmp_path: Path
) -> None:
    run = HostRun(pytester, sshd, tmp_path / "running")
    try:
        worker, qemu, cwd = run.wait_running_on_host()
        # everything the controller started here: ssh clients, local workers, their QEMUs
        local = _descendants(run.proc.pid)
        run.proc.kill()
    finally:
        run.close()
    assert _wait_gone(worker, 60), "the worker on the ssh host outlived its controller"
    assert _wait_gone(qemu, 30), "the QEMU on the ssh host outlived its controller"
    left = [pid for pid in local if not _wait_gone(pid, 30)]
    assert not left, [(pid, _comm(pid)) for pid in left]
    _remove_run_dir(cwd)


def test_a_host_that_cannot_take_part_is_named_with_what_it_lacks(
    sshd: PrivateSshd, pytester: pytest.Pytester, tmp_path: Path
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    config = tmp_path / "ssh_config"
    config.write_text(
        sshd.ssh_config.read_text()
        + f"Host fleet-nowhere\n  HostName 127.0.0.1\n  Port {dead_port}\n  BatchMode yes\n"
    )
    pytester.makepyfile(test_x="def test_x(): pass\n")
    result = pytester.runpytest_subprocess(
        f"--vmpilot-hosts={HOST},fleet-nowhere,local",
        f"--vmpilot-ssh-config={config}",
        "--vmpilot-qemu=qemu-system-vmpilot-missing",
        "-p",
        "no:cacheprovider",
        timeout=RUN_TIMEOUT,
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert f"host {HOST}: QEMU is missing: 'qemu-system-vmpilot-missing' is not on PATH" in err, err
    assert "host fleet-nowhere: cannot connect with ssh: " in err
    assert "Connection refused" in err


def test_hosts_and_arguments(tmp_path: Path) -> None:
    from vmpilot.fleet.bundle import remote_args
    from vmpilot.fleet.hosts import parse_hosts

    hosts = parse_hosts("local,me@box:2222,alias")
    assert [h.local for h in hosts] == [True, False, False]
    assert hosts[1].ssh_args()[-3:] == ["-p", "2222", "me@box"]
    assert hosts[1].dirname == "me@box_2222"
    for bad in ("a,,b", "a,a", "local,localhost", "ssh://x//y"):
        with pytest.raises(ValueError):
            parse_hosts(bad)
    # the paths under the rootdir point at the host's copy; the rest stays
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("")
    args = ["-q", "tests/test_a.py::test_x", "--vmpilot-keep-logs", "/elsewhere", "-k", "x"]
    assert remote_args(args, tmp_path, tmp_path, "/r/root") == [
        "-q",
        "/r/root/tests/test_a.py::test_x",
        "--vmpilot-keep-logs",
        "/elsewhere",
        "-k",
        "x",
    ]
