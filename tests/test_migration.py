"""Live migration between two real QEMUs over an fd-passed socketpair:
`-machine none`, the bundled guest (its shell answers on the destination),
a destination killed mid-way (`MigrationError`, the source keeps running),
a timeout (cancelled), and the asyncio face."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from conftest import run_async

from vmpilot import AsyncMachine, ConfigError, Machine, MigrationError, MigrationTimeout
from vmpilot.machine import migration
from vmpilot.pytest_plugin import VMFactory

SLOW = {"max-bandwidth": 1 << 20}  # bytes/s: 64 MiB of random RAM take a minute


def slow_pair(vm_factory: VMFactory, tmp_path: Path) -> tuple[Machine, Machine]:
    """A q35 VM whose RAM is 64 MiB of random bytes (zero pages would cost
    next to nothing to send), and its destination."""
    ram = tmp_path / "ram"
    ram.write_bytes(os.urandom(64 << 20))
    file = f"memory-backend-file,id=ram,size=64M,mem-path={ram},share=off"
    src = vm_factory(machine="q35", memory="64M",
                     extra_args=["-object", file, "-machine", "memory-backend=ram"])  # fmt: skip
    dst = vm_factory(machine="q35", memory="64M", incoming=True,
                     extra_args=["-object", "memory-backend-ram,id=ram,size=64M",
                                 "-machine", "memory-backend=ram"])  # fmt: skip
    return src, dst


def status(vm: Machine) -> str:
    return str(vm.execute("query-status")["status"])


def test_incoming_waits_for_a_migration(vm_factory: VMFactory) -> None:
    dst = vm_factory(machine="none", memory=32, incoming=True)
    assert "-incoming" in dst.argv and dst.argv[dst.argv.index("-incoming") + 1] == "defer"
    assert status(dst) == "inmigrate"
    dst.shutdown()


def test_machine_none_migrates(vm_factory: VMFactory) -> None:
    src = vm_factory(machine="none", memory=32)
    dst = vm_factory(machine="none", memory=32, incoming=True)
    seen: list[tuple[str, int, int, int]] = []
    result = src.migrate(dst, progress=lambda *v: seen.append(v))
    assert result.status == "completed"
    assert (result.source_status, result.destination_status) == ("postmigrate", "running")
    assert (status(src), status(dst)) == ("postmigrate", "running")
    assert seen and seen[-1][0] == "completed" and seen[-1][2] == 0  # nothing remaining
    assert result.transferred == seen[-1][1] > 0
    # no TCP anywhere: both ends were fds named FD_NAME
    assert not any("tcp:" in arg for arg in src.argv + dst.argv)
    src.shutdown()
    dst.shutdown()


def test_the_bundled_guest_migrates_and_its_shell_answers(
    vm_factory: VMFactory, linux_guest: Any
) -> None:
    src = vm_factory(linux_guest.config())
    src.shell.wait_ready(timeout=180)
    src.shell.check("echo before-migration > /tmp/mark")
    dst = vm_factory(linux_guest.config(incoming=True))
    result = src.migrate(dst, timeout=120)
    assert (result.source_status, result.destination_status) == ("postmigrate", "running")
    assert dst.shell.check("cat /tmp/mark", timeout=30) == "before-migration\n"
    src.shutdown()
    dst.shutdown(method="powerdown")


def test_a_killed_destination_fails_the_migration_and_the_source_runs_on(
    vm_factory: VMFactory, tmp_path: Path
) -> None:
    src, dst = slow_pair(vm_factory, tmp_path)

    sent_at_kill: list[int] = []

    def kill_destination(state: str, sent: int, remaining: int, total: int) -> None:
        if state == "active" and sent > 0 and dst.state == "running":
            sent_at_kill.append(remaining)
            dst.kill()  # mid-way: bandwidth is capped, so it is far from done

    with pytest.raises(MigrationError) as info:
        src.migrate(dst, progress=kill_destination, parameters=SLOW, timeout=60)
    assert info.value.status == "failed" and info.value.reason  # QEMU's error-desc
    assert dst.state == "stopped" and sent_at_kill[0] > 1 << 20
    assert status(src) == "running"
    src.shutdown()


def test_a_timeout_cancels_the_migration(vm_factory: VMFactory, tmp_path: Path) -> None:
    src, dst = slow_pair(vm_factory, tmp_path)
    with pytest.raises(MigrationTimeout) as info:
        src.migrate(dst, parameters=SLOW, timeout=1)
    assert info.value.status == "cancelled"
    assert status(src) == "running"
    assert src.execute("query-migrate")["status"] == "cancelled"
    src.shutdown()
    dst.kill()  # it waited for a stream that was cut: nothing to finish


def test_capabilities_reach_both_sides(vm_factory: VMFactory) -> None:
    src = vm_factory(machine="none", memory=32)
    dst = vm_factory(machine="none", memory=32, incoming=True)
    src.migrate(dst, capabilities={"postcopy-ram": True})
    for vm in (src, dst):
        caps = {c["capability"]: c["state"] for c in vm.execute("query-migrate-capabilities")}
        assert caps["postcopy-ram"] is True and caps["events"] is True
    src.shutdown()
    dst.shutdown()


def test_a_destination_not_waiting_for_a_migration_is_refused(vm_factory: VMFactory) -> None:
    src = vm_factory(machine="none", memory=32)
    dst = vm_factory(machine="none", memory=32)
    with pytest.raises(ConfigError, match="incoming=True"):
        src.migrate(dst)
    assert (status(src), status(dst)) == ("running", "running")  # nothing was sent
    src.shutdown()
    dst.shutdown()


def test_capability_list_turns_events_on_and_keeps_the_callers() -> None:
    assert migration.capability_list({"postcopy-ram": True, "events": False}) == [
        {"capability": "events", "state": False},
        {"capability": "postcopy-ram", "state": True},
    ]


def test_the_asyncio_face_migrates() -> None:
    async def main() -> tuple[str, str]:
        async with (
            AsyncMachine(machine="none", memory=32) as src,
            AsyncMachine(machine="none", memory=32, incoming=True) as dst,
        ):
            result = await src.migrate(dst)
            return result.source_status, result.destination_status

    assert run_async(main()) == ("postmigrate", "running")
