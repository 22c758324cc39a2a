"""The `snapshot_vm` pytest fixture: a freshly booted guest per test, for
the price of a snapshot revert.

Per pytest process (so per xdist worker) the bundled guest is booted once,
with a qcow2 state disk (`snapshots=True`), and snapshotted at its shell
prompt. Before each test the VM is reverted to that snapshot (`snapshot-load`
restores RAM and devices: files written in /tmp, a killed shell, a panicked
kernel are all undone) and its shell is asked one command. If QEMU is gone
(the test killed or shut it down), or the revert or the shell check fails,
the VM is killed and booted again, so one test cannot poison the next.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .errors import VMError
from .machine import Machine, MachineConfig

log = logging.getLogger("vmpilot.pytest")

TAG = "vmpilot-fresh"
BOOT_TIMEOUT = 180.0  # boot to the prompt under TCG on a busy machine
REVERT_TIMEOUT = 30.0
CHECK_TIMEOUT = 10.0  # the shell's answer after a revert (a tiny command)


class FreshVM:
    """One VM kept at its prompt snapshot; `fresh()` gives it back as booted."""

    def __init__(self, config: MachineConfig, track: Callable[[Machine], None] = lambda vm: None):
        self.config = dataclasses.replace(config, snapshots=True)
        self.track = track
        self.vm: Machine | None = None
        self.boots = 0
        self.reverts = 0

    def fresh(self) -> Machine:
        """The VM as it was at the prompt right after boot (booting again if it must)."""
        vm = self.vm
        if vm is not None:
            why = self._revert(vm)
            if why is None:
                self.reverts += 1
                return vm
            log.warning("snapshot_vm: booting again: %s", why)
        return self._boot()

    def _boot(self) -> Machine:
        self.close()
        vm = Machine(self.config)
        self.track(vm)
        vm.launch()
        try:
            vm.shell.wait_ready(timeout=BOOT_TIMEOUT)
            vm.snapshot_save(TAG)
        except BaseException:
            vm.kill()
            raise
        self.vm = vm
        self.boots += 1
        return vm

    @staticmethod
    def _revert(vm: Machine) -> str | None:
        """None when the VM is back at its snapshot with a shell that answers,
        else what is wrong with it."""
        if vm.state != "running":
            return f"QEMU is {vm.state}"
        try:
            vm.snapshot_load(TAG, timeout=REVERT_TIMEOUT)
            if vm.execute("query-status")["status"] != "running":  # a test paused it
                vm.execute("cont")
            vm.shell.run("true", timeout=CHECK_TIMEOUT)
        except (VMError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def close(self) -> None:
        vm, self.vm = self.vm, None
        if vm is not None:
            vm.kill()


@pytest.fixture(scope="session")
def vmpilot_fresh_vm(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FreshVM]:
    """The per-worker VM behind `snapshot_vm` (its `boots`/`reverts` counts)."""
    from . import pytest_plugin

    image = request.getfixturevalue("vmpilot_guest")
    defaults: dict[str, Any] = pytest_plugin._defaults(request, tmp_path_factory)
    config = pytest_plugin._merge(image.config(), defaults, {})
    fresh = FreshVM(config)
    yield fresh
    fresh.close()


@pytest.fixture
def snapshot_vm(request: pytest.FixtureRequest, vmpilot_fresh_vm: FreshVM) -> Machine:
    """The bundled guest as freshly booted, shell ready, reverted from a
    snapshot in a fraction of a boot; shared by the tests of one worker, so
    do not keep it past the test (and shutting it down costs the next test a boot)."""
    from . import pytest_plugin

    vm = vmpilot_fresh_vm.fresh()
    pytest_plugin._track(request, vm)  # its console and log tail in a failure's report
    return vm
