"""Reading Debian packages without installing them: fetch with apt, check
each file against the size and hash in apt's signed index, then pull single
files out of the data archive in memory. Nothing from a package is run."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Sequence

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


def extract(deb: Deb, want: Callable[[str], bool]) -> dict[str, bytes]:
    """{path: content} of the regular files in `deb` for which `want(path)`.

    Debian's own `dpkg-deb --fsys-tarfile` unpacks the package (every
    compression dpkg knows: xz, gzip, zstd), from the verified bytes written
    to a private file; its tar stream is read here in memory, so nothing of
    the package is ever written out as files, let alone run."""
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb is None:
        raise PackageError(
            f"reading {deb.package.filename} needs dpkg-deb (Debian's dpkg package), "
            "which is not on PATH"
        )
    found: dict[str, bytes] = {}
    with tempfile.NamedTemporaryFile(prefix="deb-", suffix=".deb") as f:  # 0600
        f.write(deb.data)
        f.flush()
        with subprocess.Popen(
            [dpkg_deb, "--fsys-tarfile", f.name], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            try:
                with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                    for member in tar:
                        path = member.name.removeprefix("./")
                        if member.isfile() and want(path):
                            data = tar.extractfile(member)
                            if data is not None:
                                found[path] = data.read()
            except tarfile.TarError as exc:
                proc.kill()
                raise PackageError(f"cannot read {deb.package.filename}: {exc}") from exc
            finally:
                proc.stdout.close()
                err = proc.stderr.read()
            if proc.wait() != 0:
                said = err.decode(errors="replace")[-500:]
                raise PackageError(f"dpkg-deb cannot read {deb.package.filename}: {said}")
    return found
