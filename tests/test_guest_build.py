"""Building the bundled guest: the cpio writer, the cache, its lock, and
the errors a user sees when packages are missing."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vmpilot.guest import PackageError, deb
from vmpilot.guest.build import cache_root
from vmpilot.guest.cpio import CpioWriter
from vmpilot.guest.tiny import bios_image


def parse_newc(data: bytes) -> list[tuple[str, int, bytes, int, int]]:
    """An independent reader: (name, mode, data, rdevmajor, rdevminor)."""
    out, pos = [], 0
    while True:
        assert data[pos : pos + 6] == b"070701", pos
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name_at = pos + 110
        name = data[name_at : name_at + namesize - 1].decode()
        body_at = name_at + namesize + (-(110 + namesize) % 4)
        body = data[body_at : body_at + filesize]
        pos = body_at + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            assert len(data) % 512 == 0
            return out
        out.append((name, f[1], body, f[9], f[10]))


def test_cpio_newc_round_trip() -> None:
    c = CpioWriter()
    c.file("etc/deep/file.txt", "hello")
    c.char_device("dev/console", 5, 1)
    c.symlink("bin/sh", "/bin/busybox")
    c.file("etc/deep/file.txt", "second add is ignored")
    entries = {e[0]: e for e in parse_newc(c.getvalue())}
    assert list(entries) == [
        "etc",
        "etc/deep",
        "etc/deep/file.txt",
        "dev",
        "dev/console",
        "bin",
        "bin/sh",
    ]
    assert entries["etc/deep/file.txt"][2] == b"hello"
    assert stat.S_ISCHR(entries["dev/console"][1]) and entries["dev/console"][3:] == (5, 1)
    assert stat.S_ISLNK(entries["bin/sh"][1]) and entries["bin/sh"][2] == b"/bin/busybox"
    assert stat.S_ISDIR(entries["etc"][1])


def test_tiny_bios_image_layout() -> None:
    rom = bios_image()
    assert len(rom) == 65536 and rom[0xFFF0:0xFFF5] == b"\xea\x00\x00\x00\xf0"
    assert b"TINY-GUEST READY" in rom


def test_missing_package_says_what_and_how(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match=r"no-such-package-vmpilot.*apt-get update"):
        deb.fetch(["no-such-package-vmpilot"], str(tmp_path / "debs"))
    assert list((tmp_path / "debs").iterdir()) == []  # nothing half-downloaded left


def test_two_processes_building_at_once_build_once(tmp_path: Path, linux_guest: object) -> None:
    # seed the package cache so that the test measures the lock, not the mirror
    debs = Path(cache_root(), "debs")
    seeded = tmp_path / "vmpilot" / "debs"
    seeded.mkdir(parents=True)
    for d in debs.glob("*.deb"):
        shutil.copy(d, seeded)
    code = textwrap.dedent(
        """
        from vmpilot import guest
        img = guest.build(progress=lambda m: print("progress:", m, flush=True))
        print("path:", img.path)
        """
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {line for out in outs for line in out.splitlines() if line.startswith("path:")}
    assert len(paths) == 1
    assert sum(out.count("progress: building") for out in outs) == 1
    guests = tmp_path / "vmpilot" / "guest"
    assert [p.name for p in guests.iterdir() if p.name.startswith(".build-")] == []


def test_deb_extraction_needs_dpkg_deb_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """.debs are read through Debian's dpkg-deb only; without it the error names it."""
    from vmpilot.guest import deb

    pkg = deb.Package("busybox-static", "x.deb", 0, "sha256", "0" * 64)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(deb.PackageError, match="dpkg-deb"):
        deb.extract(deb.Deb(pkg, b"!<arch>\n"), lambda p: True)


def test_deb_extraction_refuses_a_file_that_is_no_package() -> None:
    from vmpilot.guest import deb

    pkg = deb.Package("busybox-static", "x.deb", 0, "sha256", "0" * 64)
    with pytest.raises(deb.PackageError, match=r"x\.deb"):
        deb.extract(deb.Deb(pkg, b"this is not an ar archive"), lambda p: True)


def test_apt_answers_are_reused_only_while_apt_state_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached guest starts without asking apt again (two apt runs were most
    of `vmpilot run -- true`'s overhead), but any change to apt's state or
    configuration asks again."""
    from vmpilot.guest import deb

    calls: list[list[str]] = []
    real = deb._run

    def counting(argv: list[str], cwd: str | None = None) -> str:
        calls.append(argv)
        return real(argv, cwd)

    monkeypatch.setattr(deb, "_run", counting)
    extra = tmp_path / "extra.list"
    extra.write_text("")
    opts = [f"-oDir::Etc::SourceList={extra}"]  # a file apt reads, that this test may change
    for _ in range(2):
        with deb.remembered(str(tmp_path)):
            first = deb.resolve("linux-image-cloud-amd64", opts)
    assert len(calls) == 1
    extra.write_text("# changed\n")
    os.utime(extra, ns=(1, 1))  # a different mtime and size: apt's state changed
    with deb.remembered(str(tmp_path)):
        assert deb.resolve("linux-image-cloud-amd64", opts) == first
    assert len(calls) == 2
    assert oct((tmp_path / "apt-answers.json").stat().st_mode & 0o777) == "0o600"
