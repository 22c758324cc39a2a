"""Private temp dirs named after their controller (`vmpilot-<pid>-...`), and
the one sweeper that removes those of controllers that died without
cleaning up (SIGKILL leaves no chance to). Machine, AsyncMachine and the
compat shim all make their dirs here, so all of them are swept."""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile

_STALE = re.compile(r"^vmpilot-(\d+)-")
_swept: set[str] = set()


def sweep_stale_dirs(base: str | None = None, *, force: bool = False) -> list[str]:
    """Remove, in `base` (default: the temp dir), the dirs of controllers no
    longer alive; done once per process and base unless `force`. Only dirs
    owned by our uid are touched. Returns them."""
    base = os.path.abspath(base or tempfile.gettempdir())
    if base in _swept and not force:
        return []
    _swept.add(base)
    removed: list[str] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        m = _STALE.match(name)
        if not m or int(m[1]) == os.getpid():
            continue
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
            if st.st_uid != os.getuid() or not stat.S_ISDIR(st.st_mode):
                continue
            os.kill(int(m[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except OSError:
            continue
    return removed


def make_temp_dir(label: str = "", base: str | None = None) -> str:
    """A new 0700 dir `vmpilot-<our pid>-<label>-XXXX` in `base` (default: the
    temp dir), after sweeping `base` of dead controllers' dirs."""
    sweep_stale_dirs(base)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", label)[:40]
    prefix = f"vmpilot-{os.getpid()}-" + (f"{safe}-" if safe else "")
    return tempfile.mkdtemp(prefix=prefix, dir=base)
