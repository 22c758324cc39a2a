"""apt for another architecture's packages (arm64 on an amd64 host), private
to vmpilot's cache.

Nothing on the system changes: no `dpkg --add-architecture`, no file in
/etc/apt, no system package list. A directory in the cache holds a sources
list made from the system's own Debian sources (same mirrors, suites and
keyrings, one architecture), its own package lists, apt cache and an empty
dpkg status; every apt call for those packages names them with `-o` options
(the way tools/fetch-qemu reads backports). The lists are refreshed when
older than a day, and on demand when a download fails.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import time

from ..errors import PackageError
from . import private

SOURCE_FILES = ("/etc/apt/sources.list", "/etc/apt/sources.list.d")
MAX_AGE = 24 * 3600  # seconds before the private lists are fetched again
UPDATE_TIMEOUT = 600


def codename(os_release: str = "/etc/os-release") -> str:
    try:
        with open(os_release) as f:
            m = re.search(r"^VERSION_CODENAME=\"?([\w-]+)", f.read(), re.M)
    except OSError as exc:
        raise PackageError(f"cannot read {os_release}: {exc.strerror}") from exc
    if m is None:
        raise PackageError(f"no VERSION_CODENAME in {os_release}: is this Debian?")
    return m[1]


def _source_texts() -> list[tuple[str, str]]:
    parts = glob.glob(f"{SOURCE_FILES[1]}/*.list") + glob.glob(f"{SOURCE_FILES[1]}/*.sources")
    files = [SOURCE_FILES[0], *sorted(parts)]
    texts = []
    for path in files:
        try:
            with open(path) as f:
                texts.append((path, f.read()))
        except OSError:
            continue
    return texts


def debian_sources(release: str, texts: list[tuple[str, str]] | None = None) -> list[str]:
    """deb822 stanzas (without Architectures) for the system's binary
    sources of `release` and its suites (`release-updates`, `-security`, ...):
    their mirrors and keyrings, never a host of ours."""
    stanzas = []
    for path, text in _source_texts() if texts is None else texts:
        entries: list[tuple[str, list[str], list[str], str | None]] = []
        if path.endswith(".sources"):
            for block in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([\w-]+):[ \t]*(.*)$", block, re.M))
                if "deb" not in fields.get("Types", "").split():
                    continue
                if fields.get("Enabled", "yes").lower() == "no":
                    continue
                entries.append(
                    (fields.get("URIs", ""), fields.get("Suites", "").split(),
                     fields.get("Components", "").split(), fields.get("Signed-By"))
                )  # fmt: skip
        else:
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[([^]]*)\]\s+)?(\S+)\s+(\S+)\s*(.*)", line)
                if m is None:
                    continue
                signed = re.search(r"signed-by=(\S+)", m[1] or "")
                entries.append((m[2], [m[3]], m[4].split(), signed[1] if signed else None))
        for uri, suites, components, signed_by in entries:
            ours = [s for s in suites if s == release or s.startswith(f"{release}-")]
            if not uri or not ours or not components:
                continue
            stanza = (
                f"Types: deb\nURIs: {uri}\nSuites: {' '.join(ours)}\n"
                f"Components: {' '.join(components)}\n"
            )
            if signed_by:
                stanza += f"Signed-By: {signed_by}\n"
            stanzas.append(stanza)
    return stanzas


def apt_options(root: str, deb_arch: str) -> list[str]:
    """apt's options for the private configuration in `root` (one word each:
    `deb.fetch` drops the `-o WORD` pairs it adds itself for non-root)."""
    return [
        f"-oDir::Etc::SourceList={root}/sources.list",
        f"-oDir::Etc::SourceParts={root}/sources.list.d",
        f"-oDir::Etc::Preferences={root}/preferences",
        f"-oDir::Etc::PreferencesParts={root}/preferences.d",
        f"-oDir::State::Lists={root}/lists",
        f"-oDir::State::status={root}/status",
        f"-oDir::Cache={root}/cache",
        f"-oAPT::Architecture={deb_arch}",
        f"-oAPT::Architectures={deb_arch}",
        "-oDebug::NoLocking=1",
    ]


def prepare(cache: str, deb_arch: str, *, refresh: bool = False) -> list[str]:
    """A private apt for `deb_arch` under `cache`, its lists fresh; the
    options naming it. `PackageError` says what is missing when it cannot."""
    root = private.directory(os.path.join(cache, f"apt-{deb_arch}"))
    release = codename()
    stanzas = debian_sources(release)
    if not stanzas:
        raise PackageError(
            f"no Debian source for {release} in /etc/apt (sources.list or sources.list.d): "
            f"the {deb_arch} packages are read from the mirror the system's Debian sources use"
        )
    sources = "\n".join(s + f"Architectures: {deb_arch}\n" for s in stanzas)
    for d in ("sources.list.d", "preferences.d", "lists/partial", "cache/archives/partial"):
        os.makedirs(os.path.join(root, d), mode=0o700, exist_ok=True)
    for name, text in (("sources.list", ""), ("preferences", ""), ("status", "")):
        path = os.path.join(root, name)
        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write(text)
    path = os.path.join(root, "sources.list.d", "debian.sources")
    try:
        with open(path) as f:
            same = f.read() == sources
    except OSError:
        same = False
    if not same:
        with open(path, "w") as f:
            f.write(sources)
    stamp = os.path.join(root, "updated")
    try:
        fresh = same and time.time() - os.stat(stamp).st_mtime < MAX_AGE
    except OSError:
        fresh = False
    opts = apt_options(root, deb_arch)
    if refresh or not fresh:
        sandbox = ["-oAPT::Sandbox::User=root"] if os.geteuid() == 0 else []
        argv = ["apt-get", "-q", *opts, *sandbox, "update"]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=UPDATE_TIMEOUT)
        except FileNotFoundError as exc:
            raise PackageError(f"apt-get not found: {deb_arch} packages need Debian's apt") from exc
        except subprocess.TimeoutExpired as exc:
            raise PackageError(f"apt-get update ({deb_arch}) took over {UPDATE_TIMEOUT} s") from exc
        # apt exits 0 even when an index failed to download: its W:/E: lines say so
        failed = [ln for ln in r.stderr.splitlines() if ln.startswith(("E:", "W: Failed"))]
        if r.returncode != 0 or failed:
            raise PackageError(
                f"apt-get update of the private {deb_arch} package lists in {root} failed "
                f"(network? mirror?): {(chr(10).join(failed) or r.stderr.strip())[-1500:]}"
            )
        with open(stamp, "w") as f:
            f.write(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
    return opts
