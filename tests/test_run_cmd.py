"""`vmpilot run -- CMD ARGS`: real boots of the bundled guest under TCG; the
exit status is CMD's, a panic or a dying guest is named."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QEMU

from vmpilot.cli.run import _Stream
from vmpilot.guest import GuestImage
from vmpilot.machine import MachineConfig

VMPILOT = [sys.executable, "-m", "vmpilot", "run", "--accel", "tcg"]
ENV = {**os.environ, "VMPILOT_QEMU": QEMU}
TIMEOUT = 240  # one boot under TCG on a busy 2-core machine, with margin


def run(
    *args: str, stdin: str | None = None, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VMPILOT, *args], input=stdin, capture_output=True, text=True, timeout=TIMEOUT,
        env=ENV, cwd=cwd, stdin=None if stdin is not None else subprocess.DEVNULL,
    )  # fmt: skip


def test_exit_status_is_the_commands(linux_guest: GuestImage) -> None:
    r = run("--", "sh", "-c", "echo to-out; echo to-err >&2; exit 7")
    assert r.returncode == 7, r.stderr
    # CMD's output only: no boot messages, no markers, the bytes as printed
    assert r.stdout == "to-out\nto-err\n"


def test_panic_exits_255_and_names_it(linux_guest: GuestImage) -> None:
    r = run("--", "sh", "-c", "echo c > /proc/sysrq-trigger")
    assert r.returncode == 255
    assert "vmpilot: the guest kernel panicked:" in r.stderr
    assert "Kernel panic - not syncing: sysrq triggered crash" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_guest_that_dies_first_is_named(linux_guest: GuestImage) -> None:
    r = run("--", "sh", "-c", "echo bye; poweroff -f")
    assert r.returncode == 254
    assert "bye" in r.stdout
    assert "the guest ended before the command's status came" in r.stderr


def test_output_streams_and_stdin_comes_from_a_pipe(linux_guest: GuestImage) -> None:
    proc = subprocess.Popen(
        [*VMPILOT, "--", "sh", "-c", "echo first; read x; echo got-$x; wc -l"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        # streamed: "first" arrives while CMD still waits for its input
        assert proc.stdout.readline() == b"first\n"
        assert proc.poll() is None
        proc.stdin.write(b"piped\nsecond\nthird\n")
        proc.stdin.close()  # CMD's end of input
        rest = proc.stdout.read()
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()
    assert rest == b"got-piped\n2\n"


def test_early_input_is_not_lost_and_a_closed_stdout_is_quiet(linux_guest: GuestImage) -> None:
    r = run("--", "cat", stdin="written before the guest booted\n")
    assert (r.returncode, r.stdout) == (0, "written before the guest booted\n"), r.stderr
    # a reader that goes away early (`| head -1`): no BrokenPipe traceback
    shell = f"{' '.join(VMPILOT)} -- sh -c 'seq 1 300' | head -1"
    p = subprocess.run(
        ["bash", "-o", "pipefail", "-c", shell], capture_output=True, text=True,
        timeout=TIMEOUT, env=ENV, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert p.stdout == "1\n"
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_kernel_drive_and_append(linux_guest: GuestImage, tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    r = run(
        "--kernel", linux_guest.kernel, "--append", "vmpilot.probe=42", "--drive", str(disk),
        "--memory", "320M", "--cpus", "1", "--",
        "sh", "-c", "uname -r; grep -o vmpilot.probe=42 /proc/cmdline; "
        "grep -l 0x1001 /sys/bus/pci/devices/*/device | wc -l; cat /sys/devices/system/cpu/online",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    # your kernel with the bundled userspace (here the Debian one, passed explicitly);
    # the drive is a virtio-blk device (PCI 1af4:1001)
    assert r.stdout.split() == [linux_guest.kernel_release, "vmpilot.probe=42", "1", "0"]


def test_cwd_follows_a_share(linux_guest: GuestImage, tmp_path: Path) -> None:
    if not any(f.name == "shares" for f in dataclasses.fields(MachineConfig)):
        r = run("--share", str(tmp_path), "--", "true")
        assert r.returncode == 1 and "--share is not available" in r.stderr
        pytest.skip("shares are not in this build (the devices work brings them)")
    (tmp_path / "hello.txt").write_text("from the host\n")
    r = run("--share", str(tmp_path), "--", "sh", "-c", "pwd; cat hello.txt", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{tmp_path}\nfrom the host\n"


def test_option_parsing() -> None:
    r = run("--forward", "80", "--", "true")
    assert r.returncode == 2 and "expected HOST_PORT:GUEST_PORT" in r.stderr
    r = run("--initrd", "/x", "--", "true")
    assert r.returncode == 1 and "--initrd needs --kernel" in r.stderr
    r = run("--drive", "/no/such/disk", "--", "true")
    assert r.returncode == 1 and "--drive /no/such/disk: No such file" in r.stderr
    if not any(f.name == "net" for f in dataclasses.fields(MachineConfig)):
        for args in (["--net"], ["--forward", "0:80"]):
            r = run(*args, "--", "true")
            assert r.returncode == 1 and "is not available" in r.stderr, args


def test_stream_holds_back_a_split_marker() -> None:
    out: list[bytes] = []
    r, w = os.pipe()
    try:
        stream = _Stream("abcd", out.append, w)
        data = b"boot noise VMPRUN-Babcd\nhello\nworldVMPRUN-Eabcd 3\nafter"
        for i in range(0, len(data), 5):  # every marker split across chunks
            stream.feed(data[i : i + 5])
        assert b"".join(out) == b"hello\nworld" and stream.status == 3
        assert os.read(r, 16) == b"be"  # woke the pump at CMD's start and end
    finally:
        os.close(r)
        os.close(w)


def test_stream_passes_short_output_at_once() -> None:
    out: list[bytes] = []
    r, w = os.pipe()
    try:
        stream = _Stream("abcd", out.append, w)
        stream.feed(b"VMPRUN-Babcd\nfirst\n")
        assert b"".join(out) == b"first\n"  # not held back waiting for more output
        stream.feed(b"Password: ")
        assert b"".join(out) == b"first\nPassword: "
        stream.feed(b"x\nVMPRUN-E")  # may be the end marker: held
        assert b"".join(out) == b"first\nPassword: x\n"
        stream.feed(b"abcd 0\n")
        assert stream.status == 0 and b"".join(out) == b"first\nPassword: x\n"
    finally:
        os.close(r)
        os.close(w)
