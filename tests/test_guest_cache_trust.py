"""The guest cache, attacked: what is in it is used only when it is what we
built from what apt vouches for, and nothing in it ever runs on the host.

Each test works on a private copy of the cache (seeded from the real one, so
no test downloads the kernel again) and tampers with the copy.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from vmpilot import GuestError, guest
from vmpilot.guest import GuestImage, PackageError, elf
from vmpilot.guest.build import cache_root


def apt_filename(package: str) -> str:
    """The file name apt gives `package` (asked here, not through the code under test)."""
    out = subprocess.run(
        ["apt-get", "download", "--print-uris", package],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return out.split()[1]


@pytest.fixture
def cache(tmp_path: Path, linux_guest: GuestImage) -> Path:
    """A private cache holding copies of the real cache's packages."""
    root = tmp_path / "vmpilot"
    (root / "debs").mkdir(parents=True, mode=0o700)
    root.chmod(0o700)
    for d in Path(cache_root(), "debs").glob("*.deb"):
        shutil.copy(d, root / "debs")
    return root


def deb_with(files: dict[str, tuple[bytes, int]]) -> bytes:
    """A well-formed .deb whose data.tar.xz holds `files` ({path: (data, mode)})."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, (data, mode) in files.items():
            info = tarfile.TarInfo(f"./{path}")
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    members = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", lzma.compress(b"")),
        ("data.tar.xz", lzma.compress(buf.getvalue())),
    ]
    out = b"!<arch>\n"
    for name, data in members:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n"
        out += header.encode() + data + b"\n" * (len(data) % 2)
    return out


def test_a_tampered_initramfs_is_rebuilt_not_booted(cache: Path, linux_guest: GuestImage) -> None:
    # the real build, copied: the same inputs give the same key, so the builder finds it
    copy = cache / "guest" / os.path.basename(linux_guest.path)
    shutil.copytree(linux_guest.path, copy)
    original = (copy / "initramfs.cpio.gz").read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF  # same size: a size check alone would not see it
    (copy / "initramfs.cpio.gz").write_bytes(bytes(tampered))
    said: list[str] = []

    image = guest.build(str(cache), progress=said.append)

    assert Path(image.initrd).read_bytes() == original
    assert any("not using the cached guest" in m and "does not match" in m for m in said), said
    manifest = json.loads(Path(image.path, "manifest.json").read_text())
    assert manifest["files"]["initramfs.cpio.gz"]["sha256"] == hashlib.sha256(original).hexdigest()


def test_a_planted_package_is_never_run_and_is_replaced(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = cache.parent / "planted-code-ran"
    script = f"#!/bin/sh\ntouch {marker}\n".encode()
    planted = cache / "debs" / apt_filename("busybox-static")
    planted.write_bytes(
        deb_with({"bin/busybox": (script, 0o755), "usr/sbin/qemu-ga": (script, 0o755)})
    )
    ran: list[list[str]] = []
    real_run = subprocess.run

    def recording_run(argv: Any, *args: Any, **kwargs: Any) -> Any:
        ran.append([str(a) for a in argv])
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)

    image = guest.build(str(cache), agent=True)

    assert not marker.exists()
    assert {argv[0] for argv in ran} <= {"apt-cache", "apt-get"}, ran
    # the planted file was replaced by the package apt's index describes
    assert b"touch" not in planted.read_bytes()
    assert Path(image.path).parent.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("planted", ["a file", "a symlink to a copy"])
def test_a_cached_build_that_is_not_a_directory_of_ours_is_rebuilt(
    cache: Path, linux_guest: GuestImage, planted: str
) -> None:
    where = cache / "guest" / os.path.basename(linux_guest.path)
    where.parent.mkdir(mode=0o700)
    if planted == "a file":
        where.write_text("not a build")
    else:  # a copy with a self-consistent manifest, reached through a link
        shutil.copytree(linux_guest.path, cache.parent / "elsewhere")
        where.symlink_to(cache.parent / "elsewhere")
    said: list[str] = []
    image = guest.build(str(cache), progress=said.append)
    assert Path(image.path) == where and where.is_dir() and not where.is_symlink()
    assert any("not using the cached guest" in m for m in said), said


def test_without_apt_a_planted_build_is_not_picked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted = tmp_path / "vmpilot" / "guest" / "0123456789abcdef"
    planted.mkdir(parents=True)
    (planted / "vmlinuz").write_bytes(b"evil kernel")
    (planted / "initramfs.cpio.gz").write_bytes(b"evil initramfs")
    (planted / "manifest.json").write_text(json.dumps({"kernel_release": "6.6.6", "agent": False}))
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no apt-cache, no apt-get

    with pytest.raises(PackageError, match=r"apt cannot resolve .*no cached build is used"):
        guest.build(str(tmp_path / "vmpilot"))


def test_a_symlinked_lock_is_not_followed(cache: Path) -> None:
    victim = cache.parent / "victim"
    (cache / "guest.lock").symlink_to(victim)
    with pytest.raises(GuestError, match="cache lock"):
        guest.build(str(cache))
    assert not victim.exists()


@pytest.mark.parametrize("how", ["world-writable", "another user's"])
def test_a_cache_others_can_write_is_refused(cache: Path, how: str) -> None:
    if how == "world-writable":
        cache.chmod(0o777)
        expected = "lets others write"
    else:
        if os.geteuid() != 0:
            pytest.skip("only root can give a directory away")
        os.chown(cache, 65534, 65534)
        expected = "belongs to uid 65534"
    with pytest.raises(GuestError, match=expected):
        guest.build(str(cache))
    assert not (cache / "guest").exists()


def test_elf_dependencies_agree_with_ldd_on_a_trusted_host_program() -> None:
    program = os.path.realpath(shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64")
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    by_ldd = {
        os.path.realpath(w) for line in out.splitlines() for w in line.split() if w.startswith("/")
    }
    ours = {os.path.realpath(p) for p in elf.host_libraries(Path(program).read_bytes())}
    assert ours == by_ldd


def test_malformed_elf_is_a_guest_error() -> None:
    with pytest.raises(GuestError, match="ELF"):
        elf.dependencies(b"\x7fELF\x02\x01" + b"\xff" * 10)


def test_clean_removes_a_planted_symlink_not_what_it_points_to(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("keep me")
    root = tmp_path / "vmpilot"
    root.mkdir()
    (root / "guest").symlink_to(elsewhere)
    assert guest.clean(str(root)) == [str(root / "guest")]
    assert (elsewhere / "precious").read_text() == "keep me"
    assert not (root / "guest").exists()
