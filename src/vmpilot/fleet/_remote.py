"""Runs ON a fleet host, in its system `python3`, sent there by execnet.

Self-contained (stdlib only): the host has nothing of ours yet. One request
per channel: `provision` (check Python and QEMU, make or update the venv from
the wheels we send, unpack the test files), `logs` (the kept VM logs as a
tar), `cleanup` (remove this run's directory).
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any

STEP_TIMEOUT = 600
STALE_RUN_SECONDS = 2 * 86400


class Refused(Exception):
    """What the host lacks, said plainly (sent back as the error)."""


def cache_root(requested: str | None) -> str:
    if requested:
        return os.path.expanduser(requested)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vmpilot", "fleet")


def _run(argv: list[str], what: str, hint: str = "") -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Refused(f"{what} failed: {e}{hint}") from e
    if r.returncode != 0:
        raise Refused(f"{what} failed (exit status {r.returncode}): {r.stderr[-2000:]}{hint}")
    return r.stdout


def _check_qemu(qemu: str) -> str:
    path = shutil.which(qemu)
    if path is None:
        raise Refused(
            f"QEMU is missing: {qemu!r} is not on PATH ({os.environ.get('PATH', '')}); "
            "on Debian: apt-get install qemu-system-x86 qemu-utils"
        )
    out = _run([path, "--version"], f"{path} --version")
    return f"{path} ({out.splitlines()[0] if out else '?'})"


def _unpack(data: bytes, dest: str) -> None:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            odd = member.name.startswith("/") or ".." in member.name.split("/")
            if odd or not (member.isfile() or member.isdir()):
                raise Refused(f"refusing to unpack {member.name!r}")
        tar.extractall(dest)


def _sweep(runs: str) -> None:
    """Remove the directories of runs whose controller died long ago."""
    if not os.path.isdir(runs):
        return
    for name in os.listdir(runs):
        path = os.path.join(runs, name)
        if time.time() - os.path.getmtime(path) > STALE_RUN_SECONDS:
            shutil.rmtree(path, ignore_errors=True)


def provision(channel: Any, req: dict[str, Any]) -> dict[str, Any]:
    if sys.version_info < (3, 10):  # noqa: UP036 (the host's python3, not ours)
        raise Refused(f"python3 is {sys.version.split()[0]}; vmpilot needs Python >= 3.10")
    qemu = _check_qemu(req["qemu"])
    cache = cache_root(req.get("cache"))
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, "lock"), "w") as lock:
        # another controller provisioning this host waits here; ours gives up
        # after its provisioning timeout
        fcntl.flock(lock, fcntl.LOCK_EX)
        venv = os.path.join(cache, f"venv-py{sys.version_info[0]}.{sys.version_info[1]}")
        python = os.path.join(venv, "bin", "python")
        manifest_path = os.path.join(venv, "vmpilot-fleet.json")
        if not os.path.exists(manifest_path):
            shutil.rmtree(venv, ignore_errors=True)
            _run(
                [sys.executable, "-m", "venv", venv],
                f"{sys.executable} -m venv",
                "; on Debian: apt-get install python3-venv",
            )
            with open(manifest_path, "w") as f:
                json.dump({}, f)
        with open(manifest_path) as f:
            manifest = json.load(f)
        wanted = req["wheels"]  # filename -> content digest
        need = [fn for fn, digest in wanted.items() if manifest.get(fn.split("-")[0]) != digest]
        channel.send(("need", need))
        blobs = channel.receive(STEP_TIMEOUT)
        if blobs:
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                paths = []
                for fn, data in blobs.items():
                    paths.append(os.path.join(tmp, fn))
                    with open(paths[-1], "wb") as f:
                        f.write(data)
                _run(
                    [
                        python,
                        "-m",
                        "pip",
                        "install",
                        "-q",
                        "--disable-pip-version-check",
                        "--no-index",
                        "--no-deps",
                        "--force-reinstall",
                        *paths,
                    ],
                    "installing the wheels into " + venv,
                )
            for fn in blobs:
                manifest[fn.split("-")[0]] = wanted[fn]
            with open(manifest_path + ".new", "w") as f:
                json.dump(manifest, f)
            os.replace(manifest_path + ".new", manifest_path)
        runs = os.path.join(cache, "runs")
        _sweep(runs)
        run_dir = os.path.join(runs, req["run"])
        root = os.path.join(run_dir, "root")
        os.makedirs(root)
        os.makedirs(os.path.join(run_dir, "logs"))
        os.makedirs(os.path.join(run_dir, "tmp"))  # the workers' basetemps
        _unpack(req["tests"], root)
    return {
        "python": python,
        "run_dir": run_dir,
        "root": root,
        "cores": len(os.sched_getaffinity(0)),
        "qemu": qemu,
        "installed": sorted(blobs or ()),
    }


def logs(run_dir: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(os.path.join(run_dir, "logs"), arcname=".")
    return buf.getvalue()


if __name__ == "__channelexec__":
    chan: Any = globals()["channel"]
    cmd, arg = chan.receive()
    try:
        if cmd == "provision":
            chan.send(("ready", provision(chan, arg)))
        elif cmd == "logs":
            chan.send(("ok", logs(arg)))
        elif cmd == "cleanup":
            shutil.rmtree(arg, ignore_errors=True)
            chan.send(("ok", None))
        else:
            raise Refused(f"unknown request {cmd!r}")
    except Refused as e:
        chan.send(("error", str(e)))
    except OSError as e:
        chan.send(("error", f"{type(e).__name__}: {e}"))
