"""Reading Debian packages without installing them: fetch with apt, check
each file against the size and hash in apt's signed index, then pull single
files out of the data archive in memory. Nothing from a package is run."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import lzma
import os
import re
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import IO

from ..errors import PackageError as PackageError  # defined with every error, in errors.py
from . import private


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


def resolve(metapackage: str, apt: Sequence[str] = ()) -> str:
    """The package a metapackage points at now (kernel ABI names change with
    point releases, so they are never pinned); `PackageError` when apt cannot say.
    `apt`: options for apt (a private configuration, see `foreign`)."""
    out = _run(["apt-cache", *apt, "depends", metapackage])
    m = re.search(r"Depends: (\S+)", out)
    if m is None:
        raise PackageError(f"apt-cache knows no dependency of {metapackage}")
    return m[1]


def closure(package: str, apt: Sequence[str] = ()) -> list[str]:
    """The packages `package` needs to run (Depends, recursively; no
    Pre-Depends: those serve dpkg's maintainer scripts), itself included."""
    out = _run(
        ["apt-cache", *apt, "depends", "--recurse", "--no-recommends", "--no-suggests",
         "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", "--no-pre-depends",
         package]
    )  # fmt: skip
    return sorted({ln.strip() for ln in out.splitlines() if ln[:1] not in ("", " ", "<")})


@dataclasses.dataclass(frozen=True)
class Package:
    """A package as apt's (signed) index describes it: its file and hash."""

    name: str
    filename: str
    size: int
    hash_name: str  # hashlib's name, e.g. "sha256"
    digest: str

    def matches(self, data: bytes) -> bool:
        digest = hashlib.new(self.hash_name, data).hexdigest()
        return len(data) == self.size and digest == self.digest


@dataclasses.dataclass(frozen=True)
class Deb:
    """A package's bytes, checked against what apt says they must be."""

    package: Package
    data: bytes


def describe(packages: Iterable[str], apt: Sequence[str] = ()) -> dict[str, Package]:
    """What apt would download for `packages` (file name, size, hash)."""
    packages = list(packages)
    out = _run(["apt-get", *apt, "download", "--print-uris", "-q", *packages])
    found: dict[str, Package] = {}
    for line in out.splitlines():
        m = re.fullmatch(r"'[^']*' (\S+) (\d+) (\w+):([0-9a-f]+)", line.strip())
        if m is None:
            continue
        filename, size, algo, digest = m.groups()
        name = next((p for p in packages if filename.startswith(f"{p}_")), None)
        if name is not None and algo.lower() in ("sha256", "sha512"):
            found[name] = Package(name, filename, int(size), algo.lower(), digest)
    lost = [p for p in packages if p not in found]
    if lost:
        raise PackageError(f"apt gives no file and SHA256 for {', '.join(lost)}: {out[-500:]!r}")
    return found


def _cached(cache: str, package: Package) -> Deb | None:
    """The cached file apt named, if it is exactly what apt describes."""
    try:
        data = private.read(os.path.join(cache, package.filename))
    except OSError:
        return None
    return Deb(package, data) if package.matches(data) else None


def fetch(packages: Iterable[str], cache: str, apt: Sequence[str] = ()) -> dict[str, Deb]:
    """The verified .debs of `packages`: a cached file is used only when its
    size and hash are what apt's index says; the others are downloaded in one
    apt call into a fresh private directory, checked, then cached."""
    private.directory(cache)
    packages = list(packages)
    try:
        wanted = describe(packages, apt)
    except PackageError as exc:
        raise PackageError(
            f"apt cannot describe {', '.join(packages)} ({exc}). Run `apt-get update` "
            f"(as root) so apt knows the packages, then try again"
        ) from exc
    debs = {p: _cached(cache, pkg) for p, pkg in wanted.items()}
    missing = [p for p, d in debs.items() if d is None]
    if missing:
        with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as fresh:
            argv = ["apt-get", *apt, "download", "-q", "-o", "APT::Sandbox::User=root", *missing]
            if os.getuid() != 0:
                argv = [a for a in argv if not a.startswith("APT::Sandbox") and a != "-o"]
            try:
                _run(argv, cwd=fresh)
            except PackageError as exc:
                raise PackageError(
                    f"cannot download {', '.join(missing)} with apt ({exc}). Run `apt-get update` "
                    f"(as root) so apt knows the packages, then try again"
                ) from exc
            for p in missing:
                pkg = wanted[p]
                got = _cached(fresh, pkg)
                if got is None:
                    raise PackageError(
                        f"apt did not download {pkg.filename} with the {pkg.hash_name} its index "
                        f"gives ({pkg.digest})"
                    )
                debs[p] = got
                with contextlib.suppress(OSError):  # only a cache: the bytes are in hand
                    os.replace(os.path.join(fresh, pkg.filename), os.path.join(cache, pkg.filename))
    return {p: d for p, d in debs.items() if d is not None}


def _data_member(deb: Deb) -> tuple[str, bytes]:
    """The data.tar.* member of a .deb (an `ar` archive)."""
    f = io.BytesIO(deb.data)
    label = deb.package.filename
    if f.read(8) != b"!<arch>\n":
        raise PackageError(f"{label} is not a Debian package")
    while True:
        header = f.read(60)
        if len(header) < 60:
            raise PackageError(f"{label} has no data.tar member")
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58])
        if name.startswith("data.tar"):
            return name, f.read(size)
        f.seek(size + size % 2, os.SEEK_CUR)


def extract(deb: Deb, want: Callable[[str], bool]) -> dict[str, bytes]:
    """{path: content} of the regular files in `deb` for which `want(path)`."""
    name, data = _data_member(deb)
    stream: IO[bytes]
    if name.endswith(".xz"):
        stream = lzma.LZMAFile(io.BytesIO(data))  # noqa: SIM115 (closed by the tarfile)
    elif name.endswith(".gz"):
        stream = gzip.GzipFile(fileobj=io.BytesIO(data))  # type: ignore[assignment]
    elif name.endswith(".zst"):  # no zstd in Python before 3.14: the zstd tool decompresses
        try:
            proc = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=False)
        except FileNotFoundError as exc:
            raise PackageError(f"{deb.package.filename} needs the zstd tool") from exc
        if proc.returncode != 0:
            raise PackageError(f"zstd cannot read {deb.package.filename}: {proc.stderr[-500:]!r}")
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
