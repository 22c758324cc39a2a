"""pytest options and hooks of the fleet (registered by vmpilot's plugin).

On the controller, `--vmpilot-hosts` replaces xdist's `-n`/`--tx`: the
session becomes a `FleetSession`. On a worker, `workerinput["vmpilot_fleet"]`
says which host it is on: kept logs go where the controller collects them,
and a failing test's report names the host.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from .hosts import parse_hosts


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vmpilot", "vmpilot QEMU fixtures")
    group.addoption(
        "--vmpilot-hosts",
        metavar="HOST[,HOST...]",
        help="spread the tests over these hosts (ssh names: host, user@host, host:port, "
        "an ssh config alias; 'local' is this machine) through pytest-xdist",
    )
    group.addoption(
        "--vmpilot-ssh-config", metavar="FILE", help="ssh config file for the hosts (ssh -F FILE)"
    )
    group.addoption(
        "--vmpilot-workers-per-host",
        type=int,
        metavar="N",
        help="xdist workers on each host (default: the host's cores)",
    )


def _fleet_info(config: pytest.Config) -> dict[str, Any] | None:
    workerinput = getattr(config, "workerinput", None)
    return workerinput.get("vmpilot_fleet") if workerinput else None


@pytest.hookimpl(trylast=True)  # after the terminal reporter is there
def pytest_configure(config: pytest.Config) -> None:
    info = _fleet_info(config)
    if info is not None:
        _end_with_parent()
        if info.get("logs"):
            config.option.vmpilot_keep_logs = info["logs"]
    elif config.option.vmpilot_hosts and not hasattr(config, "workerinput"):
        _install(config)


def _end_with_parent() -> None:
    """A worker gets SIGINT (pytest unwinds, its VMs are killed) the moment
    the process that started it goes — the controller for a local worker, the
    sshd session for a remote one — rather than when execnet notices the
    closed connection (5 to 15 s later)."""
    from ..machine.process import die_with_parent

    die_with_parent(signal.SIGINT)


def _install(config: pytest.Config) -> None:
    if config.getvalue("collectonly"):
        return
    # xdist makes its own session only when given --tx (or -n): never with ours
    if getattr(config.option, "tx", None) or getattr(config.option, "numprocesses", None):
        raise pytest.UsageError("--vmpilot-hosts replaces -n/--tx: use one or the other")
    if not hasattr(config.option, "tx"):
        raise pytest.UsageError("--vmpilot-hosts needs pytest-xdist (pip install pytest-xdist)")
    try:
        hosts = parse_hosts(config.option.vmpilot_hosts)
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    from .controller import Fleet
    from .session import FleetSession

    if config.option.dist == "no":
        config.option.dist = "load"
    ssh_config = config.option.vmpilot_ssh_config
    keep = config.option.vmpilot_keep_logs
    invocation_dir = Path(config.invocation_params.dir)
    fleet = Fleet(
        hosts=hosts,
        ssh_config=os.path.abspath(ssh_config) if ssh_config else None,
        workers_per_host=config.option.vmpilot_workers_per_host,
        qemu=config.option.vmpilot_qemu or "qemu-system-x86_64",
        rootdir=config.rootpath,
        invocation_dir=invocation_dir,
        args=[str(a) for a in config.invocation_params.args],
        roots=[invocation_dir / a.split("::")[0] for a in config.args],
        inifile=config.inipath,
        keep_logs=os.path.abspath(keep) if keep else None,
    )
    config.pluginmanager.register(FleetSession(config, fleet), "dsession")
    tr = config.pluginmanager.getplugin("terminalreporter")
    if tr:
        tr.showfspath = False


@pytest.fixture(scope="session")
def vmpilot_host(pytestconfig: pytest.Config) -> str:
    """The fleet host this test runs on (`local` outside a fleet)."""
    info = _fleet_info(pytestconfig)
    return str(info["host"]) if info else "local"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield  # vmpilot's plugin has added its VM sections
    info = _fleet_info(item.config)
    if info is None or not report.failed:
        return report
    host = info["host"]
    worker = item.config.workerinput["workerid"]  # type: ignore[attr-defined]
    where = f"ran on host {host} (worker {worker})"
    if info.get("keep_logs"):
        where += f"; its VMs' logs are collected into {info['keep_logs']}/<host>/<test>/"
    sections = [("vmpilot fleet", where)]
    for title, text in report.sections:
        if title.startswith("vmpilot VM") and host not in ("local", "localhost"):
            title = title.replace("vmpilot VM", f"vmpilot VM on {host}:", 1)
            if title.endswith("full logs"):
                text = "\n".join(f"{host}:{line}" for line in text.splitlines())
        sections.append((title, text))
    report.sections = sections
    return report
