"""The aarch64 guest: Debian's arm64 cloud kernel and busybox on QEMU's virt
board under TCG. Built through a private apt configuration (the system's
gets no foreign architecture); its power button is a GPIO line the guest's
/init watches. The boots run when qemu-system-aarch64 is installed (./dev
installs Debian's qemu-system-arm)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run_async

from vmpilot import AbnormalShutdown, AsyncMachine, Machine, MachineConfig, guest
from vmpilot.errors import ConfigError, GuestError, PackageError
from vmpilot.guest import GuestImage, foreign
from vmpilot.machine.argv import build_argv

QEMU_AARCH64 = os.environ.get("VMPILOT_QEMU_AARCH64") or shutil.which("qemu-system-aarch64")
needs_qemu = pytest.mark.skipif(
    QEMU_AARCH64 is None, reason="qemu-system-aarch64 is not installed (Debian: qemu-system-arm)"
)


@pytest.fixture(scope="module")
def arm_guest() -> GuestImage:
    t0 = time.monotonic()
    image = guest.default(arch="aarch64")
    print(f"aarch64 guest {image.kernel_release} ready in {time.monotonic() - t0:.1f} s")
    return image


def boot(image: GuestImage, options: str = "") -> Machine:
    assert QEMU_AARCH64 is not None
    return Machine(image.config(options=options, qemu=QEMU_AARCH64)).launch()


# -- per-architecture defaults (pure) ------------------------------------


def test_aarch64_defaults_pick_binary_board_and_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMPILOT_QEMU_AARCH64", raising=False)
    monkeypatch.delenv("VMPILOT_ACCEL", raising=False)
    cfg = MachineConfig(arch="aarch64")
    assert (cfg.qemu, cfg.machine) == ("qemu-system-aarch64", "virt")
    argv = build_argv(cfg, "tcg")
    assert argv[0] == "qemu-system-aarch64"
    assert argv[argv.index("-machine") + 1] == "type=virt"
    assert argv[argv.index("-cpu") + 1] == "cortex-a57"  # virt's own default is 32-bit
    assert cfg.resolve_accel() == ("tcg", "an aarch64 guest on an x86_64 host")
    # what the user says wins
    mine = MachineConfig(arch="aarch64", qemu="/opt/q", machine="virt-7.2", cpu="max")
    argv = build_argv(mine, "tcg")
    assert argv[0] == "/opt/q" and "type=virt-7.2" in argv and argv[argv.index("-cpu") + 1] == "max"
    monkeypatch.setenv("VMPILOT_QEMU_AARCH64", "/opt/qemu-10/qemu-system-aarch64")
    assert MachineConfig(arch="aarch64").qemu == "/opt/qemu-10/qemu-system-aarch64"


def test_x86_defaults_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMPILOT_QEMU", raising=False)
    cfg = MachineConfig()
    assert (cfg.arch, cfg.qemu, cfg.machine) == ("x86_64", "qemu-system-x86_64", "q35")
    assert "-cpu" not in build_argv(cfg, "tcg")
    assert build_argv(cfg, "kvm")[build_argv(cfg, "kvm").index("-cpu") + 1] == "host"


def test_unknown_arch_and_bad_cpu_are_refused() -> None:
    with pytest.raises(ConfigError, match="arch 'riscv64' is not one of x86_64, aarch64"):
        MachineConfig(arch="riscv64").to_argv("tcg")
    with pytest.raises(ConfigError, match="invalid CPU model"):
        MachineConfig(arch="aarch64", cpu="max,pauth=off").to_argv("tcg")
    with pytest.raises(GuestError, match="no bundled guest for arch 'riscv64'"):
        guest.default(arch="riscv64")


# -- the private apt -----------------------------------------------------

SOURCES = [
    (
        "/etc/apt/sources.list.d/debian.sources",
        "Types: deb deb-src\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main contrib\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm-backports\n"
        "Components: main\nEnabled: no\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\nComponents: main\n",
    ),
    (
        "/etc/apt/sources.list",
        "# a comment\ndeb [arch=amd64 signed-by=/k.gpg] http://sec.example/debian-security "
        "bookworm-security main\ndeb http://vendor.example/apt cloud-sdk-bookworm main\n",
    ),
]


def test_private_sources_copy_the_systems_debian_mirrors_only() -> None:
    stanzas = foreign.debian_sources("bookworm", SOURCES)
    assert stanzas == [
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main contrib\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\nSigned-By: /k.gpg\n",
    ]  # disabled, deb-src only and other vendors' suites are left out


def test_no_debian_source_says_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(foreign, "_source_texts", lambda: [])
    with pytest.raises(PackageError, match="no Debian source for .* in /etc/apt"):
        foreign.prepare(str(tmp_path), "arm64")


def test_building_adds_no_foreign_architecture_to_the_system(arm_guest: GuestImage) -> None:
    out = subprocess.run(
        ["dpkg", "--print-foreign-architectures"], capture_output=True, text=True, check=True
    )
    assert "arm64" not in out.stdout.split()
    manifest = Path(arm_guest.path, "manifest.json").read_text()
    assert '"arch": "aarch64"' in manifest and "_arm64.deb" in manifest
    assert arm_guest.arch == "aarch64" and "console=ttyAMA0" in arm_guest.append


# -- boots ---------------------------------------------------------------


@needs_qemu
def test_aarch64_boot_shell_and_powerdown(arm_guest: GuestImage) -> None:
    t0 = time.monotonic()
    with boot(arm_guest) as vm:
        vm.console.expect(guest.READY, timeout=120, fail="Kernel panic")
        vm.shell.wait_ready(timeout=60)
        boot_s = time.monotonic() - t0
        assert vm.shell.run("uname -m") == (0, "aarch64\n")
        assert vm.shell.run("uname -r")[1].strip() == arm_guest.kernel_release
        assert vm.shell.run("cat /proc/cmdline")[1].startswith("console=ttyAMA0")
        status, out = vm.shell.run("echo out; echo err >&2; exit_code() { return 7; }; exit_code")
        assert (status, out) == (7, "out\nerr\n")
        t1 = time.monotonic()
        vm.shutdown(method="powerdown", timeout=30)  # no AbnormalShutdown: the guest powered off
        print(f"aarch64 boot→prompt {boot_s:.1f} s, powerdown→exit {time.monotonic() - t1:.2f} s")
    assert vm.exit_code == 0 and "power button, powering off" in vm.console_log


@needs_qemu
def test_aarch64_guest_ignoring_power_button_is_killed(arm_guest: GuestImage) -> None:
    vm = boot(arm_guest, "vmpilot.pd=ignore")
    vm.shell.wait_ready(timeout=120)
    with pytest.raises(AbnormalShutdown, match="did not exit within 3 s of 'system_powerdown'"):
        vm.shutdown(method="powerdown", timeout=3)
    assert "power button ignored" in vm.console_log
    assert vm.state == "stopped"


@needs_qemu
def test_aarch64_async_machine(arm_guest: GuestImage) -> None:
    async def main() -> str:
        assert QEMU_AARCH64 is not None
        async with AsyncMachine(arm_guest.config(qemu=QEMU_AARCH64)) as vm:
            await vm.shell.wait_ready(timeout=120)
            status, out = await vm.shell.run("echo $(uname -m) $((6*7))")
            assert status == 0
            await vm.shutdown(method="powerdown")
            return out

    assert run_async(main()) == "aarch64 42\n"


@needs_qemu
def test_aarch64_agent_from_arm64_packages() -> None:
    """qemu-ga for arm64 with its libraries from its dependencies' arm64
    packages (the host's are x86-64): exec, files, and a powerdown by agent."""
    image = guest.default(arch="aarch64", agent=True)
    assert image.agent and image.arch == "aarch64"
    assert QEMU_AARCH64 is not None
    vm = Machine(image.config(qemu=QEMU_AARCH64)).launch()
    try:
        agent = vm.wait_for_agent(timeout=120)
        r = agent.exec(["/bin/sh", "-c", "uname -m; echo err >&2; exit 3"])
        assert (r.exit_code, r.stdout, r.stderr) == (3, b"aarch64\n", b"err\n")
        agent.write_file("/tmp/blob", b"\x00\xff" * 1000)
        assert agent.read_file("/tmp/blob") == b"\x00\xff" * 1000
        agent.shutdown("powerdown")  # no answer on success: the VM ends
        assert vm.wait(timeout=60) == 0
    finally:
        vm.kill()


def test_clean_removes_the_private_apt_directories(tmp_path: Path) -> None:
    root = tmp_path / "vmpilot"
    (root / "apt-arm64" / "lists").mkdir(parents=True)
    (root / "debs").mkdir()
    (root / "keep").mkdir()
    assert guest.clean(str(root)) == [str(root / "debs"), str(root / "apt-arm64")]
    assert sorted(p.name for p in root.iterdir()) == ["keep"]
