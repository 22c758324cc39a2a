"""pytest fixtures for VMs (active when vmpilot is installed).

- `vm_factory`: makes `Machine`s (launched by default) and tracks them; at
  teardown any VM still running is killed and the test fails (a leak).
- `vm`: a running bundled Linux guest, shell prompt ready.
- `snapshot_vm`: the same, booted once per worker and reverted to a
  snapshot before each test (see `snapshot_fixture`).
- `qmp_vm`: a fast `-machine none` VM for protocol tests.
- `async_vm_factory`, and with pytest-asyncio (or anyio) `async_vm` and
  `async_qmp_vm`: the same for `AsyncMachine`.

Options: `--vmpilot-qemu`, `--vmpilot-accel`, `--vmpilot-keep-logs DIR`,
`--vmpilot-log-level` (INFO; DEBUG adds every QMP message). A failing test
gets its VMs' console and QEMU log tails, the log paths, and the tail of
vmpilot's own log (the `vmpilot` loggers) as report sections. Safe under
pytest-xdist: every path is per test (inside pytest's per-worker tmp dirs),
no ports, and the guest build takes a file lock.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any, TypeVar, cast

import pytest

from . import guest
from .console.core import visible
from .machine import AsyncMachine, Machine, MachineConfig
from .shell import scrub
from .snapshot_fixture import snapshot_vm as snapshot_vm  # a fresh guest per test, by revert
from .snapshot_fixture import vmpilot_fresh_vm as vmpilot_fresh_vm

# --vmpilot-hosts: spread the suite over a fleet of hosts (pytest-xdist over ssh)
pytest_plugins = ["vmpilot.fleet.plugin"]

_VMS = pytest.StashKey[list[Machine | AsyncMachine]]()
_LOG = pytest.StashKey["_LogTail"]()
TAIL = 3000
LOG_LINES = 200  # the vmpilot log section keeps at most this many lines (and TAIL * 2 chars)


class _LogTail(logging.Handler):
    """The last `LOG_LINES` records of the `vmpilot` loggers during one test."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.lines: deque[str] = deque(maxlen=LOG_LINES)
        self.setFormatter(
            logging.Formatter(
                "%(asctime)s.%(msecs)03d %(name)s %(levelname)s %(message)s", "%H:%M:%S"
            )
        )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:
            self.handleError(record)

    def text(self) -> str:
        return "\n".join(self.lines)[-TAIL * 2 :]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vmpilot", "vmpilot QEMU fixtures")
    group.addoption("--vmpilot-qemu", help="QEMU binary for the fixtures' VMs")
    group.addoption("--vmpilot-accel", help="accelerator for the fixtures' VMs (kvm, tcg, auto)")
    group.addoption(
        "--vmpilot-keep-logs",
        metavar="DIR",
        help="keep every VM's qemu.log and console.log under DIR/<test>/ "
        "(default: in pytest's tmp dir for the test)",
    )
    group.addoption(
        "--vmpilot-log-level",
        default="INFO",
        help="level of vmpilot's log kept for a failing test's report (default INFO; "
        "DEBUG adds every QMP message, and costs time)",
    )


def _defaults(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    opts = request.config.option
    out: dict[str, Any] = {}
    if opts.vmpilot_qemu:
        out["qemu"] = opts.vmpilot_qemu
    if opts.vmpilot_accel:
        out["accel"] = opts.vmpilot_accel
    safe = re.sub(r"[^\w.-]+", "_", request.node.name)[:60]
    if opts.vmpilot_keep_logs:
        logs = os.path.join(opts.vmpilot_keep_logs, safe)
        os.makedirs(logs, exist_ok=True)
    else:
        logs = str(tmp_path_factory.mktemp(f"vmpilot-{safe}", numbered=True))
    out["log_dir"] = logs
    return out


def _track(request: pytest.FixtureRequest, vm: Machine | AsyncMachine) -> None:
    request.node.stash.setdefault(_VMS, []).append(vm)


def _leaked(vms: list[Any]) -> list[Any]:
    return [vm for vm in vms if vm.state not in ("new", "stopped", "failed")]


class VMFactory:
    """`vm_factory(config=None, *, launch=True, **overrides)` → a `Machine`."""

    def __init__(self, request: pytest.FixtureRequest, defaults: dict[str, Any]) -> None:
        self._request = request
        self._defaults = defaults
        self.machines: list[Machine] = []

    def __call__(
        self, config: MachineConfig | None = None, *, launch: bool = True, **overrides: Any
    ) -> Machine:
        vm = Machine(_merge(config, self._defaults, overrides))
        self.machines.append(vm)
        _track(self._request, vm)
        if launch:
            vm.launch()
        return vm


class AsyncVMFactory:
    """`await async_vm_factory(config=None, *, launch=True, **overrides)` → an
    `AsyncMachine`, launched on the running loop."""

    def __init__(self, request: pytest.FixtureRequest, defaults: dict[str, Any]) -> None:
        self._request = request
        self._defaults = defaults
        self.machines: list[AsyncMachine] = []

    async def __call__(
        self, config: MachineConfig | None = None, *, launch: bool = True, **overrides: Any
    ) -> AsyncMachine:
        vm = AsyncMachine(_merge(config, self._defaults, overrides))
        self.machines.append(vm)
        _track(self._request, vm)
        if launch:
            await vm.launch()
        return vm


def _merge(
    config: MachineConfig | None, defaults: dict[str, Any], overrides: dict[str, Any]
) -> MachineConfig:
    base = config or MachineConfig()
    values = {k: v for k, v in defaults.items() if k != "qemu" and k != "accel"}
    # the command-line options win over the defaults of a config, not over
    # what the test asked for explicitly
    if "qemu" in defaults and (config is None or config.qemu == MachineConfig().qemu):
        values["qemu"] = defaults["qemu"]
    if "accel" in defaults and (config is None or config.accel == "auto"):
        values["accel"] = defaults["accel"]
    values.update(overrides)
    return dataclasses.replace(base, **values)


def _fail_on_leaks(kind: str, vms: list[Any], kill: Any) -> None:
    leaked = _leaked(vms)
    for vm in leaked:
        kill(vm)
    if leaked:
        pytest.fail(
            f"{len(leaked)} {kind} still running at the end of the test (killed now): "
            + ", ".join(f"pid {vm.pid}" for vm in leaked)
            + "; shut them down (or use them in `with`) in the test",
            pytrace=False,
        )


@pytest.fixture
def vm_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VMFactory]:
    factory = VMFactory(request, _defaults(request, tmp_path_factory))
    yield factory
    _fail_on_leaks("VM(s)", factory.machines, lambda vm: vm.kill())


@pytest.fixture
def async_vm_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AsyncVMFactory]:
    factory = AsyncVMFactory(request, _defaults(request, tmp_path_factory))
    yield factory
    _fail_on_leaks("AsyncMachine(s)", factory.machines, AsyncMachine.abandon)


@pytest.fixture(scope="session")
def vmpilot_guest() -> guest.GuestImage:
    """The bundled Linux guest (built once, cached, safe under xdist)."""
    return guest.default()


@pytest.fixture
def vm(vm_factory: VMFactory, vmpilot_guest: guest.GuestImage) -> Iterator[Machine]:
    """A running bundled Linux guest with its shell ready; shut down after."""
    machine = vm_factory(vmpilot_guest.config())
    machine.shell.wait_ready(timeout=180)
    yield machine
    machine.shutdown(method="powerdown", timeout=30)


@pytest.fixture
def qmp_vm(vm_factory: VMFactory) -> Iterator[Machine]:
    """A `-machine none` VM: QMP only, launched in tens of milliseconds."""
    machine = vm_factory(machine="none", memory=32)
    yield machine
    machine.shutdown()


try:  # async fixtures need an async-aware runner
    import pytest_asyncio

    _fixture_impl: Any = pytest_asyncio.fixture
except ImportError:  # anyio runs plain async fixtures for its tests
    _fixture_impl = pytest.fixture

_F = TypeVar("_F", bound=Callable[..., Any])


def _async_fixture(fn: _F) -> _F:
    return cast(_F, _fixture_impl(fn))


@_async_fixture
async def async_vm(
    async_vm_factory: AsyncVMFactory, vmpilot_guest: guest.GuestImage
) -> AsyncIterator[AsyncMachine]:
    machine = await async_vm_factory(vmpilot_guest.config())
    await machine.shell.wait_ready(timeout=180)
    yield machine
    await machine.shutdown(method="powerdown", timeout=30)


@_async_fixture
async def async_qmp_vm(async_vm_factory: AsyncVMFactory) -> AsyncIterator[AsyncMachine]:
    machine = await async_vm_factory(machine="none", memory=32)
    yield machine
    await machine.shutdown()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    """Keep the tail of vmpilot's log while the test runs (for its report)."""
    level = logging.getLevelName(str(item.config.option.vmpilot_log_level).upper())
    if not isinstance(level, int):
        raise pytest.UsageError(
            f"--vmpilot-log-level: no such level {item.config.option.vmpilot_log_level!r}"
        )
    logger = logging.getLogger("vmpilot")
    tail = _LogTail(level)
    item.stash[_LOG] = tail
    saved = logger.level
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    logger.addHandler(tail)
    try:
        return (yield)
    finally:
        logger.removeHandler(tail)
        logger.setLevel(saved)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if not report.failed:
        return report
    tail = item.stash.get(_LOG, None)
    if tail is not None and tail.lines:
        report.sections.append((f"vmpilot log (last {LOG_LINES} lines at most)", tail.text()))
    vms = item.stash.get(_VMS, [])
    for i, vm in enumerate(vms):
        label = f"vmpilot VM {i} (pid {vm.pid}, {vm.state})"
        if vm.config.serial:
            # as a person should read it: no shell markers, control characters escaped
            console = scrub(vm.console_log)[-TAIL:]
            report.sections.append((f"{label}: console (tail)", console))
        report.sections.append((f"{label}: QEMU log (tail)", visible(vm.log)[-TAIL:] or "(empty)"))
        paths = [p for p in (vm.log_dir,) if p]
        report.sections.append(
            (f"{label}: full logs", "\n".join(paths) or "(not kept: see --vmpilot-keep-logs)")
        )
    return report
