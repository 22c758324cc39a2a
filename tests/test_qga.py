"""The guest agent: protocol core, and the client against qemu-ga in the
bundled guest."""

from __future__ import annotations

import json
import time

import pytest
from conftest import QEMU, run_async

from vmpilot import AsyncMachine, GuestError, Machine, Timeout, guest
from vmpilot.guest import GuestImage
from vmpilot.qga import AgentError, AgentProtocol, AgentTimeout


@pytest.fixture(scope="module")
def agent_guest() -> GuestImage:
    return guest.default(agent=True)


def test_protocol_discards_stale_answers_until_its_token() -> None:
    p = AgentProtocol()
    req = p.sync_request()
    assert req[:1] == b"\xff" and req.endswith(b"\n")
    token = json.loads(req[1:])["arguments"]["id"]
    assert p.receive_data(b'{"return": {"old": 1}}\n') == []  # before the 0xFF: stale
    assert p.receive_data(b'\xff{"return": 12345}\n') == [] and not p.synced
    assert p.receive_data(b'{"return": %d}\n{"return": {}}\n' % token) == [{"return": {}}]
    assert p.synced
    assert p.receive_data(b'{"ret') == [] and p.receive_data(b'urn": 7}\n') == [{"return": 7}]
    with pytest.raises(GuestError, match="invalid JSON"):
        p.receive_data(b"garbage\n")


def test_agent_exec_files_info_and_shutdown(agent_guest: GuestImage) -> None:
    vm = Machine(agent_guest.config(qemu=QEMU)).launch()
    try:
        agent = vm.wait_for_agent(timeout=120)
        agent.ping()
        assert agent.info()["version"]
        r = agent.exec(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
        r = agent.exec(["/bin/cat"], input=b"fed through stdin")
        assert (r.exit_code, r.stdout) == (0, b"fed through stdin")
        data = bytes(range(256)) * 4096  # 1 MiB
        agent.write_file("/tmp/blob", data)
        assert agent.read_file("/tmp/blob") == data
        assert agent.exec(["/bin/sh", "-c", "wc -c < /tmp/blob"]).stdout.strip() == b"1048576"
        with pytest.raises(AgentError) as info:
            agent.read_file("/no/such/file")
        assert info.value.command == "guest-file-open" and "No such file" in info.value.desc
        with pytest.raises(AgentTimeout, match="to finish in the guest"):
            agent.exec(["/bin/sleep", "5"], timeout=0.3)
        assert agent.fsfreeze_status() == "thawed"
        assert any(i["name"] == "lo" for i in agent.network_interfaces())
        agent.shutdown("powerdown")  # no answer on success: the VM ends
        assert vm.wait(timeout=60) == 0
    finally:
        vm.kill()


def test_agent_not_running_is_a_clear_timeout(tmp_path: object) -> None:
    bios = guest.tiny.write(str(tmp_path))
    with Machine(guest.tiny.config(bios, qemu=QEMU, agent=True)) as vm:
        t0 = time.monotonic()
        with pytest.raises(AgentTimeout, match=r"0.5 s waiting for the guest agent") as info:
            vm.wait_for_agent(timeout=0.5)
        assert time.monotonic() - t0 < 3
        assert isinstance(info.value, GuestError) and isinstance(info.value, Timeout)
    with pytest.raises(GuestError, match="closed"):
        vm.agent.ping(timeout=1)


def test_async_agent(agent_guest: GuestImage) -> None:
    async def main() -> None:
        async with AsyncMachine(agent_guest.config(qemu=QEMU)) as vm:
            agent = await vm.wait_for_agent(timeout=120)
            r = await agent.exec(["/bin/uname", "-r"])
            assert r.exit_code == 0 and r.stdout.strip() == agent_guest.kernel_release.encode()
            assert (await agent.info())["version"]
            data = bytes(range(256)) * 4096  # 1 MiB: many chunks each way
            await agent.write_file("/tmp/blob", data)
            assert await agent.read_file("/tmp/blob") == data
            r = await agent.exec(["/bin/sh", "-c", "wc -c < /tmp/blob"])
            assert r.stdout.strip() == b"1048576"
            with pytest.raises(AgentError) as info:
                await agent.read_file("/no/such/file")
            assert info.value.command == "guest-file-open" and "No such file" in info.value.desc
            with pytest.raises(AgentTimeout, match="to finish in the guest"):
                await agent.exec(["/bin/sleep", "5"], timeout=0.3)
            assert await agent.fsfreeze_status() == "thawed"
            assert any(i["name"] == "lo" for i in await agent.network_interfaces())
            await agent.shutdown()
            assert await vm.wait(timeout=60) == 0

    run_async(main())


def test_machine_without_agent_channel() -> None:
    with (
        Machine(machine="none", qemu=QEMU, memory=16) as vm,
        pytest.raises(Exception, match="agent=True"),
    ):
        vm.agent  # noqa: B018
