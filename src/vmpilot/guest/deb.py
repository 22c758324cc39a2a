"""Reading Debian packages without installing them: fetch with apt, then
pull single files out of the data archive."""

from __future__ import annotations

import glob
import gzip
import io
import lzma
import os
import re
import subprocess
import tarfile
from collections.abc import Callable, Iterable
from typing import IO

from ..errors import PackageError as PackageError  # defined with every error, in errors.py


def _run(argv: list[str], cwd: str | None = None) -> str:
    try:
        r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as exc:
        raise PackageError(f"{argv[0]} not found: building the guest needs Debian's apt") from exc
    except subprocess.TimeoutExpired as exc:
        raise PackageError(f"{' '.join(argv)} took longer than 600 s") from exc
    if r.returncode != 0:
        raise PackageError(f"{' '.join(argv)} failed: {r.stderr.strip()[-2000:]}")
    return r.stdout


def resolve(metapackage: str) -> str | None:
    """The package a metapackage points at now (kernel ABI names change with
    point releases, so they are never pinned), or None when apt cannot say."""
    try:
        out = _run(["apt-cache", "depends", metapackage])
    except PackageError:
        return None
    m = re.search(r"Depends: (\S+)", out)
    return m[1] if m else None


def cached(cache: str, package: str) -> str | None:
    hits = glob.glob(os.path.join(cache, f"{glob.escape(package)}_*.deb"))
    return max(hits, key=os.path.getmtime) if hits else None


def fetch(packages: Iterable[str], cache: str) -> dict[str, str]:
    """Paths of the .debs of `packages`, downloading the missing ones in one apt call."""
    os.makedirs(cache, exist_ok=True)
    packages = list(packages)
    missing = [p for p in packages if cached(cache, p) is None]
    if missing:
        argv = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *missing]
        if os.getuid() != 0:
            argv = [a for a in argv if not a.startswith("APT::Sandbox") and a != "-o"]
        try:
            _run(argv, cwd=cache)
        except PackageError as exc:
            raise PackageError(
                f"cannot download {', '.join(missing)} with apt ({exc}). Run `apt-get update` "
                f"(as root) so apt knows the packages, then try again"
            ) from exc
    debs = {p: cached(cache, p) for p in packages}
    lost = [p for p, d in debs.items() if d is None]
    if lost:
        raise PackageError(f"apt did not fetch {', '.join(lost)} into {cache}")
    return {p: d for p, d in debs.items() if d is not None}


def _data_member(deb: str) -> tuple[str, bytes]:
    """The data.tar.* member of a .deb (an `ar` archive)."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise PackageError(f"{deb} is not a Debian package")
        while True:
            header = f.read(60)
            if len(header) < 60:
                raise PackageError(f"{deb} has no data.tar member")
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58])
            if name.startswith("data.tar"):
                return name, f.read(size)
            f.seek(size + size % 2, os.SEEK_CUR)


def extract(deb: str, want: Callable[[str], bool]) -> dict[str, bytes]:
    """{path: content} of the regular files in `deb` for which `want(path)`."""
    name, data = _data_member(deb)
    stream: IO[bytes]
    if name.endswith(".xz"):
        stream = lzma.LZMAFile(io.BytesIO(data))  # noqa: SIM115 (closed by the tarfile)
    elif name.endswith(".gz"):
        stream = gzip.GzipFile(fileobj=io.BytesIO(data))  # type: ignore[assignment]
    elif name.endswith(".zst"):  # no zstd in Python before 3.14: let dpkg-deb decompress
        proc = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], capture_output=True, check=False)
        if proc.returncode != 0:
            raise PackageError(f"dpkg-deb cannot read {deb}: {proc.stderr.decode()[-500:]}")
        stream = io.BytesIO(proc.stdout)
    else:
        stream = io.BytesIO(data)
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            path = member.name.removeprefix("./")
            if member.isfile() and want(path):
                f = tar.extractfile(member)
                if f is not None:
                    found[path] = f.read()
    return found
