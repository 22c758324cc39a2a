"""The guest cache is trusted only as far as nobody else can write it.

Its directories must be ours (effective uid) and writable by nobody else,
its lock is never reached through a symlink, and its files are opened
without following one: whoever could change them could change what we boot.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator

from ..errors import GuestError


def _check(path: str, st: os.stat_result, kind: str) -> None:
    if st.st_uid != os.geteuid():
        raise GuestError(
            f"refusing {kind} {path}: it belongs to uid {st.st_uid}, not to us "
            f"(uid {os.geteuid()}); whoever owns it could change what we boot"
        )
    if st.st_mode & 0o022:
        raise GuestError(
            f"refusing {kind} {path}: mode {stat.S_IMODE(st.st_mode):04o} lets others write "
            f"it; `chmod go-w {path}` if that is intended to be private"
        )


def directory(path: str, *, follow: bool = False) -> str:
    """Create `path` (0700) if missing; raise `GuestError` unless it is a
    directory of ours that nobody else can write. A symlink is refused unless
    `follow` (the cache root may be a link the user made; what is below it not)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path) if follow else os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise GuestError(f"refusing cache directory {path}: it is not a directory (a symlink?)")
    _check(path, st, "cache directory")
    return path


def read(path: str) -> bytes:
    """The contents of a regular file of ours, never through a symlink
    (`OSError` otherwise, as for a missing file)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(f"{path} is not a regular file of ours")
        return f.read()


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created 0600, never via a symlink)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise GuestError(f"cannot open the cache lock {path} ({exc}; a symlink?)") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise GuestError(f"refusing the cache lock {path}: it is not a regular file")
        _check(path, st, "cache lock")
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the fd closes
        yield
    finally:
        os.close(fd)
