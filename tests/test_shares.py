"""Host directories in the guest (`MachineConfig(shares=[Share(...)])`):
virtiofs through a virtiofsd the Machine owns (started before QEMU, reaped
after it, dead with its controller even on SIGKILL), 9p where there is no
virtiofsd. The argv is checked purely; the rest with real QEMU and the
bundled guest."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import QEMU, run_async

from vmpilot import AsyncMachine, ConfigError, LaunchError, Machine, MachineConfig, Share
from vmpilot.guest import GuestImage
from vmpilot.machine import virtiofs
from vmpilot.machine.argv import Wiring, build_argv
from vmpilot.machine.tempdirs import sweep_stale_dirs

BOOT_TIMEOUT = 120
needs_virtiofsd = pytest.mark.skipif(
    virtiofs.find_virtiofsd() is None, reason="no virtiofsd installed"
)


def kernel_config(tmp_path: Path, **kw: object) -> MachineConfig:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"")
    return MachineConfig(qemu=QEMU, kernel=str(kernel), append="console=ttyS0", **kw)  # type: ignore[arg-type]


def test_virtiofs_argv_shares_guest_memory_and_passes_the_daemon_socket(tmp_path: Path) -> None:
    cfg = kernel_config(tmp_path, shares=[Share(tmp_path, "/mnt/a b,c", readonly=True)])
    argv = build_argv(cfg, "tcg", Wiring(virtiofs_fds=[42]))
    assert argv[argv.index("-machine") + 1] == "type=q35,memory-backend=vmpilot-mem"
    assert "memory-backend-memfd,id=vmpilot-mem,size=256M,share=on" in argv
    assert "socket,id=vmpilot-fs0,fd=42" in argv
    assert "vhost-user-fs-pci,chardev=vmpilot-fs0,tag=vmpilot0" in argv
    append = argv[argv.index("-append") + 1]
    assert append == "console=ttyS0 vmpilot.share=virtiofs:vmpilot0:ro:/mnt/a%20b%2Cc"
    assert 42 in Wiring(virtiofs_fds=[42]).fds


def test_without_a_virtiofsd_shares_go_over_qemus_9p(tmp_path: Path) -> None:
    cfg = kernel_config(tmp_path, shares=[Share(tmp_path, readonly=True)])
    argv = build_argv(cfg, "tcg")
    assert f"local,id=vmpilot-fs0,path={tmp_path},security_model=none,readonly=on" in argv
    assert "virtio-9p-pci,fsdev=vmpilot-fs0,mount_tag=vmpilot0" in argv
    assert not any("memory-backend" in a for a in argv)
    assert argv[argv.index("-append") + 1].endswith(f"vmpilot.share=9p:vmpilot0:ro:{tmp_path}")


@pytest.mark.parametrize(
    ("shares", "message"),
    [
        (["/tmp"], "must be Share objects"),
        ([Share("/nonexistent/dir")], "does not exist"),
        ([Share("/tmp", "relative")], "must be absolute"),
        ([Share("/tmp", "/x"), Share("/var", "/x")], "two shares are mounted at '/x'"),
        ([Share("/tmp", "/.")], "over the guest's root"),
    ],
)
def test_bad_shares_are_refused_before_qemu_runs(
    tmp_path: Path, shares: list[object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        kernel_config(tmp_path, shares=shares).validate()


def test_without_a_kernel_the_tags_are_for_the_guest_to_mount() -> None:
    argv = build_argv(MachineConfig(qemu=QEMU, shares=[Share("/tmp")]), "tcg")
    assert "-append" not in argv
    assert "virtio-9p-pci,fsdev=vmpilot-fs0,mount_tag=vmpilot0" in argv


def _children(name: str, parent: int | None = None) -> set[int]:
    """The child processes called `name` of `parent` (default: this process):
    the daemons this test's VM started."""
    parent = os.getpid() if parent is None else parent
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if comm == name and ppid == parent:
            found.add(int(entry))
    return found


@needs_virtiofsd
def test_shared_directory_both_ways_and_readonly_refused(
    linux_guest: GuestImage, tmp_path: Path
) -> None:
    rw, ro = tmp_path / "rw dir", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (rw / "from-host.txt").write_text("written on the host\n")
    (ro / "keep.txt").write_text("read-only\n")
    cfg = linux_guest.config(qemu=QEMU, shares=[Share(rw), Share(ro, "/mnt/ro", readonly=True)])
    vm = Machine(cfg).launch()
    with vm:
        daemons = _children("virtiofsd")
        assert len(daemons) == 2
        vm.shell.wait_ready(timeout=BOOT_TIMEOUT)
        assert vm.shell.check(f"cat '{rw}/from-host.txt'") == "written on the host\n"
        vm.shell.check(f"echo written in the guest > '{rw}/from-guest.txt'")
        assert vm.shell.check("cat /mnt/ro/keep.txt") == "read-only\n"
        status, out = vm.shell.run("echo no > /mnt/ro/new.txt")
        assert status != 0 and "Read-only file system" in out
        vm.shutdown(method="powerdown", timeout=60)
    assert (rw / "from-guest.txt").read_text() == "written in the guest\n"
    assert not (ro / "new.txt").exists()
    assert _children("virtiofsd") == set()  # reaped by the post-shutdown step
    for pid in daemons:
        assert not Path(f"/proc/{pid}").exists()


@needs_virtiofsd
def test_virtiofsd_dies_with_a_sigkilled_controller(
    linux_guest: GuestImage, tmp_path: Path
) -> None:
    # a controller launches a VM with two shares and is SIGKILLed: no cleanup
    # runs there, the daemons' death signal must end them
    script = textwrap.dedent(
        f"""
        import sys
        from vmpilot import Machine, MachineConfig, Share
        Machine(MachineConfig(qemu={QEMU!r}, kernel={linux_guest.kernel!r},
                              shares=[Share({str(tmp_path)!r}), Share("/tmp", "/t")])).launch()
        print("up", flush=True)
        sys.stdin.read()
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as ctl:
        assert ctl.stdout is not None
        assert ctl.stdout.readline() == "up\n"
        pids = sorted(_children("virtiofsd", ctl.pid))
        assert len(pids) == 2, pids
        fds = [os.pidfd_open(pid) for pid in pids]
        try:
            ctl.kill()
            ctl.wait(timeout=10)
            for fd in fds:  # a pidfd is readable once its process has exited
                ready, _, _ = select.select([fd], [], [], 10)
                assert ready, f"virtiofsd still alive 10 s after its controller's SIGKILL: {pids}"
        finally:
            for fd in fds:
                os.close(fd)
    # the dead controller's temp dir is the next controller's to sweep
    assert any(str(ctl.pid) in d for d in sweep_stale_dirs(force=True))


def test_9p_fallback_without_virtiofsd_reaches_the_guest(
    linux_guest: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Debian's cloud kernel has no 9p: QEMU serves the share, the guest says
    # it cannot mount it (a kernel with 9p, e.g. Debian's generic one, does)
    monkeypatch.setenv("VMPILOT_VIRTIOFSD", "none")
    with Machine(linux_guest.config(qemu=QEMU, shares=[Share(tmp_path, "/mnt/s")])) as vm:
        assert _children("virtiofsd") == set()
        vm.console.expect("cannot mount the 9p share vmpilot0 at /mnt/s", timeout=BOOT_TIMEOUT)
        assert "virtio-9p-pci" in vm.argv[vm.argv.index("-fsdev") + 2 :][1]


def test_a_failing_virtiofsd_fails_the_launch_with_its_own_words(
    linux_guest: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "virtiofsd"
    fake.write_text("#!/bin/sh\necho 'fake virtiofsd: cannot serve this' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("VMPILOT_VIRTIOFSD", str(fake))
    vm = Machine(linux_guest.config(qemu=QEMU, shares=[Share(tmp_path)]))
    with pytest.raises(LaunchError) as err:
        vm.launch()
    assert "virtiofsd for share 0:\nfake virtiofsd: cannot serve this" in str(err.value)
    assert vm.state == "failed" and vm.temp_dir is None


@needs_virtiofsd
def test_async_machine_reaps_its_virtiofsd_too(linux_guest: GuestImage, tmp_path: Path) -> None:
    async def main() -> set[int]:
        vm = AsyncMachine(linux_guest.config(qemu=QEMU, shares=[Share(tmp_path)]))
        await vm.launch()
        daemons = _children("virtiofsd")
        await vm.kill()
        return daemons

    daemons = run_async(main())
    assert len(daemons) == 1
    assert _children("virtiofsd") == set()
