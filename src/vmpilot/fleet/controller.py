"""The controller's view of the fleet: provision every host, name the
workers, and at the end bring the logs home and leave nothing behind.

Each remote host gets one *control* gateway (ssh + the host's `python3`) for
provisioning and the end-of-run chores; the test workers are separate xdist
gateways running the venv's Python. When the controller dies, ssh sees its
stdin close, the remote Pythons see theirs close, and execnet ends them
(SIGINT after 5 s, `os._exit` after 15 s); their QEMUs die with them
(`PR_SET_PDEATHSIG`).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import execnet

from . import _remote, bundle
from .hosts import Host

PROVISION_TIMEOUT = 900.0
PROBE_TIMEOUT = 30.0
CHORE_TIMEOUT = 120.0


class FleetError(Exception):
    """A host cannot take part; the message names it and says why."""


@dataclass
class Remote:
    """A provisioned host."""

    host: Host
    gateway: Any  # execnet.Gateway (the control one)
    python: str
    run_dir: str
    root: str
    cores: int
    qemu: str
    seconds: float
    installed: list[str]


@dataclass
class Fleet:
    hosts: list[Host]
    ssh_config: str | None
    workers_per_host: int | None
    qemu: str
    rootdir: Path
    invocation_dir: Path
    args: list[str]  # the controller's command line
    roots: list[Path]  # what is collected (config.args as paths)
    inifile: Path | None
    keep_logs: str | None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    remotes: dict[str, Remote] = field(default_factory=dict)
    down: dict[str, str] = field(default_factory=dict)  # host name -> why
    group: Any = field(default_factory=lambda: execnet.Group())
    bundled: tuple[float, int, int] | None = None  # seconds, wheels, test files
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- ssh -----------------------------------------------------------

    def ssh_base(self) -> list[str]:
        return ["ssh", *(["-F", self.ssh_config] if self.ssh_config else [])]

    def xspec(self, host: Host, python: str, chdir: str | None = None) -> str:
        spec = "ssh=" + " ".join(host.ssh_args())
        if self.ssh_config:
            spec += f"//ssh_config={self.ssh_config}"
        spec += f"//python={python}"
        return spec + (f"//chdir={chdir}" if chdir else "")

    def probe(self, host: Host) -> str | None:
        """None if `ssh host true` works, else what ssh said."""
        argv = [*self.ssh_base(), *host.ssh_args(), "true"]
        try:
            r = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=PROBE_TIMEOUT,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return f"ssh did not answer within {PROBE_TIMEOUT:.0f} s"
        if r.returncode == 0:
            return None
        return (r.stderr.strip() or f"ssh exited with status {r.returncode}").splitlines()[-1]

    # -- provisioning ------------------------------------------------------

    def provision(self) -> None:
        """Provision every remote host, in parallel; FleetError on the first
        host that cannot take part."""
        remote = [h for h in self.hosts if not h.local]
        if not remote:
            return
        t0 = time.monotonic()
        wheels = bundle.wheels()
        files = bundle.test_files(self.rootdir, self.roots, self.inifile)
        tests = bundle.tar_files(self.rootdir, files)
        self.bundled = (time.monotonic() - t0, len(wheels), len(files))
        with ThreadPoolExecutor(len(remote)) as pool:
            results = list(pool.map(lambda h: self._provision_one(h, wheels, tests), remote))
        errors = [r for r in results if isinstance(r, str)]
        for r in results:
            if isinstance(r, Remote):
                self.remotes[r.host.name] = r
        if errors:
            self.finish()
            raise FleetError("\n".join(errors))

    def _provision_one(self, host: Host, wheels: list[bundle.Wheel], tests: bytes) -> Remote | str:
        t0 = time.monotonic()
        why = self.probe(host)
        if why:
            return f"host {host.name}: cannot connect with ssh: {why}"
        try:
            with self._lock:  # one Group, provisioned from several threads
                gw = self.group.makegateway(self.xspec(host, "python3"))
        except (execnet.HostNotFound, OSError, EOFError) as e:
            return f"host {host.name}: cannot start python3 there ({type(e).__name__}: {e})"
        try:
            ch = gw.remote_exec(_remote)
            req = {
                "qemu": self.qemu,
                "run": self.run_id,
                "wheels": {w.filename: w.digest for w in wheels},
                "tests": tests,
            }
            ch.send(("provision", req))
            kind, body = ch.receive(PROVISION_TIMEOUT)
            if kind == "need":
                ch.send({w.filename: w.data for w in wheels if w.filename in body})
                kind, body = ch.receive(PROVISION_TIMEOUT)
        except (execnet.TimeoutError, execnet.RemoteError, OSError, EOFError) as e:
            gw.exit()
            return f"host {host.name}: provisioning failed: {e}"
        if kind != "ready":
            gw.exit()
            return f"host {host.name}: {body}"
        return Remote(
            host=host,
            gateway=gw,
            python=body["python"],
            run_dir=body["run_dir"],
            root=body["root"],
            cores=body["cores"],
            qemu=body["qemu"],
            seconds=time.monotonic() - t0,
            installed=body["installed"],
        )

    # -- workers -------------------------------------------------------------

    def workers(self, host: Host) -> int:
        if self.workers_per_host:
            return self.workers_per_host
        if host.local:
            return len(os.sched_getaffinity(0))
        return self.remotes[host.name].cores

    def specs(self) -> list[str]:
        out = []
        for host in self.hosts:
            if host.local:
                out += ["popen"] * self.workers(host)
            else:
                r = self.remotes[host.name]
                out += [self.xspec(host, r.python, self.remote_cwd(r))] * self.workers(host)
        return out

    def remote_cwd(self, r: Remote) -> str:
        inv = self.invocation_dir.resolve()
        root = self.rootdir.resolve()
        return str(Path(r.root, inv.relative_to(root))) if inv.is_relative_to(root) else r.root

    def remote_argv(self, r: Remote) -> list[str]:
        args = bundle.remote_args(self.args, self.invocation_dir, self.rootdir, r.root)
        return [*args, f"--rootdir={r.root}"]

    def host_of_spec(self, spec: Any) -> Host:
        for host in self.hosts:
            if not host.local and spec.ssh == " ".join(host.ssh_args()):
                return host
        return next(h for h in self.hosts if h.local)

    def worker_info(self, host: Host) -> dict[str, Any]:
        """What a worker learns about its host (in `workerinput`)."""
        info: dict[str, Any] = {"host": host.name, "keep_logs": self.keep_logs}
        if self.keep_logs:
            if host.local:
                info["logs"] = os.path.join(self.keep_logs, host.dirname)
            else:
                info["logs"] = os.path.join(self.remotes[host.name].run_dir, "logs")
        return info

    # -- the end -----------------------------------------------------------

    def finish(self) -> list[str]:
        """Bring the kept logs home, remove each host's run directory, close
        the control gateways. Returns a line per host that could not."""
        notes = []
        for name, r in self.remotes.items():
            if name in self.down:
                notes.append(
                    f"host {name} is down: its run directory {r.run_dir} stays there "
                    "(a later run on that host removes it after 2 days)"
                )
                continue
            try:
                if self.keep_logs:
                    data = self._chore(r, "logs", r.run_dir)
                    _extract(data, os.path.join(self.keep_logs, r.host.dirname))
                self._chore(r, "cleanup", r.run_dir)
            except (execnet.TimeoutError, execnet.RemoteError, OSError, EOFError, FleetError) as e:
                notes.append(f"host {name}: logs not collected, run directory not removed: {e}")
        self.group.terminate(timeout=10)
        return notes

    def _chore(self, r: Remote, cmd: str, arg: Any) -> Any:
        ch = r.gateway.remote_exec(_remote)
        ch.send((cmd, arg))
        kind, body = ch.receive(CHORE_TIMEOUT)
        if kind != "ok":
            raise FleetError(body)
        return body


def _extract(data: bytes, dest: str) -> None:
    """Unpack a host's logs tar under `dest`, refusing odd member names."""
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            if m.name.startswith("/") or ".." in m.name.split("/"):
                raise FleetError(f"odd name in the logs: {m.name!r}")
            if m.isdir():
                os.makedirs(os.path.join(dest, m.name), exist_ok=True)
            elif m.isfile():
                src = tar.extractfile(m)
                assert src is not None
                with open(os.path.join(dest, m.name), "wb") as f:
                    shutil.copyfileobj(src, f)
