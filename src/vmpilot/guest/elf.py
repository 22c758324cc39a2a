"""Which shared libraries an x86-64 ELF program needs, read from its bytes.

`ldd` would answer too, but it may run the program it inspects; the guest
build never runs a file taken from a package.
"""

from __future__ import annotations

import os
import struct

from ..errors import GuestError

PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_SONAME = 0, 1, 5, 14
# where Debian's x86-64 loader looks when there is no ld.so.cache to ask
LIBRARY_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib")


def _cstr(data: bytes, offset: int) -> str:
    end = data.index(b"\0", offset)
    return data[offset:end].decode()


def dependencies(data: bytes) -> tuple[str | None, list[str]]:
    """(the program interpreter path or None, the DT_NEEDED names)."""
    interp, names = _dynamic(data, DT_NEEDED)
    return interp, names


def soname(data: bytes) -> str | None:
    """A shared library's DT_SONAME (the name programs ask for), if any."""
    return next(iter(_dynamic(data, DT_SONAME)[1]), None)


def _dynamic(data: bytes, want: int) -> tuple[str | None, list[str]]:
    """(the program interpreter path or None, the strings of `want` entries)."""
    try:
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise GuestError("not a 64-bit little-endian ELF file")
        (phoff,) = struct.unpack_from("<Q", data, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
        phdrs = [struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize) for i in range(phnum)]
        loads = [(p[3], p[5], p[2]) for p in phdrs if p[0] == PT_LOAD]  # vaddr, filesz, offset

        def at(vaddr: int) -> int:
            for start, size, offset in loads:
                if start <= vaddr < start + size:
                    return int(vaddr - start + offset)
            raise GuestError(f"address {vaddr:#x} is in no loaded segment")

        interp = next((_cstr(data, p[2]) for p in phdrs if p[0] == PT_INTERP), None)
        dyn = next((p for p in phdrs if p[0] == PT_DYNAMIC), None)
        if dyn is None:
            return interp, []
        entries = []
        for pos in range(dyn[2], dyn[2] + dyn[5], 16):
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == DT_NULL:
                break
            entries.append((tag, value))
        strtab = at(next(v for t, v in entries if t == DT_STRTAB))
        return interp, [_cstr(data, strtab + v) for t, v in entries if t == want]
    except (struct.error, IndexError, ValueError, StopIteration, UnicodeDecodeError) as exc:
        raise GuestError(f"malformed ELF file: {exc!r}") from exc


def packaged_libraries(program: bytes, files: dict[str, bytes]) -> dict[str, bytes]:
    """{path in the guest: bytes} of everything `program` loads (its
    interpreter and the closure of DT_NEEDED), taken from `files` ({path:
    bytes}, the shared libraries of its Debian packages), for a guest of
    another architecture than the host's. Each goes to its package's
    directory under the name programs ask for (its soname)."""
    by_name: dict[str, tuple[str, bytes]] = {}
    for path, data in sorted(files.items()):
        name = soname(data) if data[:4] == b"\x7fELF" else None
        if name is not None:
            by_name.setdefault(name, (f"{os.path.dirname(path)}/{name}", data))
    interp, todo = dependencies(program)
    found: dict[str, bytes] = {}
    if interp is not None:
        name = os.path.basename(interp)
        if name not in by_name:
            raise GuestError(f"no package gives the program interpreter {interp}")
        found[interp.lstrip("/")] = by_name[name][1]
        todo.append(name)
    seen: set[str] = set()
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        if name not in by_name:
            raise GuestError(f"qemu-ga needs {name}, which none of its dependencies' packages has")
        path, data = by_name[name]
        found[path] = data
        todo.extend(dependencies(data)[1])
    return found


def host_libraries(program: bytes) -> list[str]:
    """Paths of the host's copies of everything `program` loads (its
    interpreter and the closure of DT_NEEDED), in a stable order."""
    interp, todo = dependencies(program)
    found = {os.path.basename(interp): interp} if interp else {}
    while todo:
        name = todo.pop(0)
        if name in found:
            continue
        path = next((f"{d}/{name}" for d in LIBRARY_DIRS if os.path.exists(f"{d}/{name}")), None)
        if path is None:
            raise GuestError(
                f"qemu-ga needs {name}, missing on this machine: install qemu-system-x86 "
                f"(it depends on the same libraries)"
            )
        found[name] = path
        with open(os.path.realpath(path), "rb") as f:
            todo.extend(dependencies(f.read())[1])
    return sorted(set(found.values()))
