"""A cpio "newc" archive writer: what the kernel unpacks as an initramfs.

Written in Python so that building a guest needs no root: device nodes such
as /dev/console are just header fields here, not mknod calls.
"""

from __future__ import annotations

import stat


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    """Collects entries in memory; `getvalue()` returns the archive.

    Parent directories are added on demand, and a path added twice keeps its
    first entry, so callers can add files in any order.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._paths: set[str] = set()
        self._ino = 1
        self.size = 0

    def _entry(
        self, path: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        path = path.strip("/")
        if not path or path in self._paths:
            return
        parent = path.rpartition("/")[0]
        if parent and parent not in self._paths:
            self.directory(parent)
        self._paths.add(path)
        name = path.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name), 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields) + name
        chunk = header + _pad4(len(header)) + data + _pad4(len(data))
        self._chunks.append(chunk)
        self.size += len(chunk)

    def directory(self, path: str, perm: int = 0o755) -> None:
        self._entry(path, stat.S_IFDIR | perm)

    def file(self, path: str, data: bytes | str, perm: int = 0o644) -> None:
        self._entry(path, stat.S_IFREG | perm, data.encode() if isinstance(data, str) else data)

    def symlink(self, path: str, target: str) -> None:
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(path, stat.S_IFCHR | perm, rdev=(major, minor))

    def getvalue(self) -> bytes:
        trailer = b"070701" + b"".join(b"%08X" % f for f in (0,) * 11 + (11, 0)) + b"TRAILER!!!\0"
        data = b"".join(self._chunks) + trailer + _pad4(len(trailer))
        return data + b"\0" * (-len(data) % 512)
