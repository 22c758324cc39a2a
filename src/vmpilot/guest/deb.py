"""Reading Debian packages without installing them: fetch with apt, check
each file against the size and hash in apt's signed index, then pull single
files out of the data archive in memory. Nothing from a package is run."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ..errors import PackageError as PackageError  # defined with every error, in errors.py
from . import private

# apt's answers to the read-only queries below (which package a metapackage
# names, which file and hash a package has) depend only on apt's state: its
# lists, caches and configuration. While that is unchanged, `remembered`
# lets a process reuse the answers an earlier one got (two apt runs cost
# ~1 s, most of a cached guest's start-up) from a file in the private cache.
_memo: dict[str, Any] | None = None
_memo_path: str | None = None
_APT_STATE = ("/etc/apt", "/var/lib/apt/lists", "/var/cache/apt", "/var/lib/dpkg/status")
_APT_DIR_OPTIONS = ("Dir::State::Lists", "Dir::Etc::SourceList", "Dir::Etc::SourceParts",
                    "Dir::Etc::Preferences", "Dir::Etc::PreferencesParts", "Dir::State::status",
                    "Dir::Cache")  # fmt: skip


def _apt_state(argv: Sequence[str]) -> str:
    """A fingerprint of everything apt's answer to `argv` depends on: the
    name, size and mtime of each file of its state and configuration (the
    system's, and any private directories the options name)."""
    paths = list(_APT_STATE)
    for word in argv:
        key, eq, value = word.removeprefix("-o").partition("=")
        if word.startswith("-o") and eq and key in _APT_DIR_OPTIONS:
            paths.append(value)
    seen: list[tuple[str, int, int]] = []

    def note(path: str, depth: int) -> None:
        try:
            st = os.stat(path)
        except OSError:
            seen.append((path, -1, -1))
            return
        seen.append((path, st.st_size, st.st_mtime_ns))
        if depth and os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                if name not in ("partial", "archives", "lock"):
                    note(os.path.join(path, name), depth - 1)

    for path in paths:
        note(path, 2)
    return hashlib.sha256(json.dumps([list(argv), seen]).encode()).hexdigest()


@contextlib.contextmanager
def remembered(cache: str) -> Iterator[None]:
    """Within this block, apt's answers to the read-only queries are kept in
    (and reused from) `cache`/apt-answers.json while apt's state is
    unchanged. The file lives in the private cache, like the builds it
    serves; an answer only names packages, whose bytes are still checked
    against it."""
    global _memo, _memo_path
    path = os.path.join(cache, "apt-answers.json")
    try:
        loaded = json.loads(private.read(path))
        memo: dict[str, Any] = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        memo = {}
    before = dict(memo)
    _memo, _memo_path = memo, path
    try:
        yield
    finally:
        _memo = _memo_path = None
        if memo != before:
            tmp = f"{path}.{os.getpid()}"
            with contextlib.suppress(OSError):
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "w") as f:
                    json.dump(dict(list(memo.items())[-64:]), f)
                os.replace(tmp, path)


def _query(argv: list[str]) -> str:
    """`_run` for a read-only apt query, answered from `remembered` when apt's
    state is what it was then."""
    if _memo is None:
        return _run(argv)
    key = _apt_state(argv)
    answer = _memo.get(key)
    if isinstance(answer, str):
        return answer
    out = _run(argv)
    _memo[key] = out
    return out


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
    out = _query(["apt-cache", *apt, "depends", metapackage])
    m = re.search(r"Depends: (\S+)", out)
    if m is None:
        raise PackageError(f"apt-cache knows no dependency of {metapackage}")
    return m[1]


def closure(package: str, apt: Sequence[str] = ()) -> list[str]:
    """The packages `package` needs to run (Depends, recursively; no
    Pre-Depends: those serve dpkg's maintainer scripts), itself included."""
    out = _query(
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
    out = _query(["apt-get", *apt, "download", "--print-uris", "-q", *packages])
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
