"""User-mode networking with port forwards: `MachineConfig(forwards=[(0, 80)])`
gives the guest a virtio-net NIC (configured by DHCP at boot) and a host port
on 127.0.0.1 that QEMU binds itself (port 0: the kernel picks it, so no
race), read back with `vm.forwarded_port(80)`."""

from __future__ import annotations

import socket

import pytest
from conftest import QEMU, run_async

from vmpilot import AsyncMachine, ConfigError, Machine, MachineConfig, VMError
from vmpilot.guest import GuestImage
from vmpilot.machine.argv import build_argv

BOOT_TIMEOUT = 120


def test_forwards_listen_on_loopback_and_imply_a_nic() -> None:
    argv = build_argv(MachineConfig(qemu=QEMU, forwards=[(0, 80), (2222, 22)]), "tcg")
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev == (
        "user,id=vmpilot-net,hostfwd=tcp:127.0.0.1:0-:80,hostfwd=tcp:127.0.0.1:2222-:22"
    )
    assert "virtio-net-pci,netdev=vmpilot-net" in argv
    assert "-netdev" in build_argv(MachineConfig(qemu=QEMU, net=True), "tcg")
    assert "-netdev" not in build_argv(MachineConfig(qemu=QEMU), "tcg")


@pytest.mark.parametrize(
    "forwards",
    [[(0, 0)], [(70000, 80)], [("80", 80)], [(True, 80)], [(1, 2, 3)], [(0, 80), (1, 80)]],
)
def test_bad_forwards_are_refused(forwards: list[object]) -> None:
    with pytest.raises(ConfigError):
        MachineConfig(qemu=QEMU, forwards=forwards).validate()  # type: ignore[arg-type]


def test_port_zero_is_bound_by_qemu_and_read_back() -> None:
    # no guest needed (firmware only): QEMU binds the forwards at startup
    with Machine(qemu=QEMU, machine="q35", accel="tcg", forwards=[(0, 80), (0, 22)]) as vm:
        ports = {vm.forwarded_port(80), vm.forwarded_port(22)}
        assert len(ports) == 2 and 0 not in ports
        for port in ports:  # listening, on loopback
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        with pytest.raises(VMError, match="guest port 443 is not forwarded"):
            vm.forwarded_port(443)


def test_async_forwarded_port() -> None:
    async def main() -> int:
        async with AsyncMachine(qemu=QEMU, machine="q35", accel="tcg", forwards=[(0, 80)]) as vm:
            return await vm.forwarded_port(80)

    assert run_async(main()) > 0


def test_a_server_in_the_guest_is_reached_through_the_forward(linux_guest: GuestImage) -> None:
    with Machine(linux_guest.config(qemu=QEMU, forwards=[(0, 8080)])) as vm:
        vm.shell.wait_ready(timeout=BOOT_TIMEOUT)
        assert "inet 10.0.2.15/24" in vm.shell.check("ip -4 addr show eth0")  # udhcpc at boot
        # busybox httpd backgrounds itself once it listens
        vm.shell.check("mkdir -p /www && echo hello from the guest > /www/index.html")
        vm.shell.check("httpd -p 8080 -h /www")
        port = vm.forwarded_port(8080)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
            conn.settimeout(30)
            reply = b""
            while chunk := conn.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.") and reply.endswith(b"hello from the guest\n")
