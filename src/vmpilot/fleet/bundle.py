"""What a remote host needs from here: wheels and the test files.

Wheels: pytest, pytest-xdist and every installed pytest plugin (anything with
a `pytest11` entry point, vmpilot included), with what they require, so a
remote worker loads exactly the plugins the local ones do (a missing plugin
changes collection, and xdist then refuses: "Different tests were
collected"). A project installed from a directory (`pip install -e .`) is
built into a wheel with `pip wheel`; everything else is re-packed from its
installed files (the same version as here, no index needed on the host).

Test files: the collection roots (the path arguments, else `testpaths`, else
the invocation directory), the `conftest.py`/`__init__.py` files above them up
to the rootdir, and the ini file, as one tar, laid out as under the rootdir.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata as md
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

BUILD_TIMEOUT = 600.0
MAX_TEST_BYTES = 200 * 1024 * 1024
_SKIP_DIRS = {"__pycache__", "node_modules"}


@dataclass(frozen=True)
class Wheel:
    filename: str
    data: bytes
    digest: str  # of the contents, not the zip (rebuilds keep it when nothing changed)

    @property
    def project(self) -> str:
        return self.filename.split("-")[0].lower()


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _content_digest(data: bytes) -> str:
    h = hashlib.sha256()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for name in sorted(z.namelist()):
            h.update(name.encode() + b"\0" + z.read(name) + b"\0")
    return h.hexdigest()[:20]


def needed_distributions() -> list[md.Distribution]:
    """pytest, pytest-xdist, the pytest plugins, and their requirements."""
    by_name: dict[str, md.Distribution] = {}
    for d in md.distributions():  # the first on sys.path wins, as for imports
        by_name.setdefault(_norm(d.metadata["Name"]), d)
    todo = ["pytest", "pytest-xdist"]
    todo += [
        _norm(d.metadata["Name"])
        for d in by_name.values()
        if any(ep.group == "pytest11" for ep in d.entry_points)
    ]
    seen: dict[str, md.Distribution] = {}
    while todo:
        name = todo.pop()
        if name in seen or name not in by_name:
            continue
        dist = seen[name] = by_name[name]
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_norm(req.name))
    return sorted(seen.values(), key=lambda d: _norm(d.metadata["Name"]))


def _source_dir(dist: md.Distribution) -> str | None:
    """The directory a project was installed from in editable mode, if so."""
    text = dist.read_text("direct_url.json")
    if not text:
        return None
    info = json.loads(text)
    if info.get("dir_info", {}).get("editable") and info["url"].startswith("file://"):
        return str(info["url"][len("file://") :])
    return None


def _tree_key(source: str) -> str:
    """Changes when a file of the project does (names, sizes, mtimes)."""
    h = hashlib.sha256()
    for path in sorted(_walk(Path(source))):
        if any(p in ("build", "dist") or p.endswith(".egg-info") for p in path.parts):
            continue
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "vmpilot", "fleet", "wheels")


def build_wheel(source: str) -> bytes:
    """`pip wheel` of a project directory (its own build backend), cached
    here until a file of the project changes."""
    cached = _cache_dir() / f"{_tree_key(source)}.whl"
    if cached.exists():
        return cached.read_bytes()
    data = _pip_wheel(source)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, cached)
    return data


def _pip_wheel(source: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="vmpilot-fleet-wheel-") as out:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, source]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
        if r.returncode != 0:
            raise RuntimeError(f"building a wheel of {source} failed:\n{r.stderr[-3000:]}")
        (name,) = os.listdir(out)
        return Path(out, name).read_bytes()


def repack(dist: md.Distribution) -> tuple[str, bytes]:
    """A wheel made of an installed distribution's files (as recorded)."""
    files = [f for f in dist.files or [] if not str(f).startswith("..")]
    info_dirs = {f.parts[0] for f in files if f.parts[0].endswith(".dist-info")}
    if len(info_dirs) != 1:
        raise RuntimeError(f"{dist.metadata['Name']}: cannot find its .dist-info")
    info = info_dirs.pop()
    wheel_meta = dist.read_text("WHEEL") or ""
    tags = re.findall(r"^Tag: (\S+)$", wheel_meta, re.M) or ["py3-none-any"]
    stem = info[: -len(".dist-info")]
    parts = [t.split("-") for t in tags]  # py2.py3-none-any is two Tag: lines
    tag = "-".join(".".join(dict.fromkeys(p[i] for p in parts)) for i in range(3))
    filename = f"{stem}-{tag}.whl"
    skip = {f"{info}/{n}" for n in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}
    buf = io.BytesIO()
    rows = []
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            name = str(f).replace(os.sep, "/")
            if name in skip or "__pycache__" in f.parts or name.endswith(".pyc"):
                continue
            data = Path(str(dist.locate_file(f))).read_bytes()
            z.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            rows.append((name, f"sha256={digest.decode()}", str(len(data))))
        record = io.StringIO()
        csv.writer(record, lineterminator="\n").writerows([*rows, (f"{info}/RECORD", "", "")])
        z.writestr(f"{info}/RECORD", record.getvalue())
    return filename, buf.getvalue()


def wheels() -> list[Wheel]:
    """Every wheel a remote worker's venv needs (built or re-packed here, once)."""
    out = []
    for dist in needed_distributions():
        source = _source_dir(dist)
        if source:
            data = build_wheel(source)
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                info = next(n for n in z.namelist() if n.endswith(".dist-info/WHEEL"))
            filename = info.split(".dist-info")[0] + "-py3-none-any.whl"
        else:
            filename, data = repack(dist)
        out.append(Wheel(filename, data, _content_digest(data)))
    return out


# -- the test files ------------------------------------------------------


def _walk(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d
            for d in dirnames
            if not d.startswith(".")
            and d not in _SKIP_DIRS
            and not os.path.exists(os.path.join(dirpath, d, "pyvenv.cfg"))
        ]
        for name in filenames:
            if not name.endswith((".pyc", ".pyo")):
                yield Path(dirpath, name)


def test_files(rootdir: Path, roots: Iterable[Path], inifile: Path | None) -> list[Path]:
    """The files to ship, as paths under `rootdir`."""
    rootdir = rootdir.resolve()
    chosen: set[Path] = set()
    for root in roots:
        root = root.resolve()
        if not root.is_relative_to(rootdir):
            raise ValueError(f"{root} is outside the rootdir {rootdir}: it cannot be shipped")
        chosen.update(_walk(root))
        for parent in [root, *root.parents]:
            if not parent.is_relative_to(rootdir):
                break
            for name in ("conftest.py", "__init__.py"):
                if (parent / name).is_file():
                    chosen.add(parent / name)
    if inifile is not None and inifile.resolve().is_relative_to(rootdir):
        chosen.add(inifile.resolve())
    return sorted(chosen)


def tar_files(rootdir: Path, files: list[Path]) -> bytes:
    """The files as an uncompressed tar, named relative to `rootdir`."""
    buf = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in files:
            total += path.stat().st_size
            if total > MAX_TEST_BYTES:
                raise ValueError(
                    f"the test files under {rootdir} exceed {MAX_TEST_BYTES >> 20} MiB; "
                    "name the test directories to ship on the command line"
                )
            tar.add(str(path), arcname=str(path.relative_to(rootdir.resolve())), recursive=False)
    return buf.getvalue()


def remote_args(
    args: Iterable[str], invocation_dir: Path, rootdir: Path, remote_root: str
) -> list[str]:
    """The command-line arguments with every path under the rootdir moved to
    its copy on the host (`file.py::test` keeps its `::test`)."""
    rootdir = rootdir.resolve()
    out = []
    for arg in args:
        path, sep, rest = arg.partition("::")
        p = Path(path)
        candidate = p if p.is_absolute() else invocation_dir / p
        try:
            exists = not arg.startswith("-") and candidate.exists()
        except OSError:
            exists = False
        if exists and candidate.resolve().is_relative_to(rootdir):
            rel = candidate.resolve().relative_to(rootdir)
            out.append(str(Path(remote_root, rel)) + sep + rest)
        else:
            out.append(arg)
    return out
