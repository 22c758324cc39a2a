"""Drop-in compatibility with QEMU's in-tree Python library (`qemu.machine`,
`qemu.qmp.legacy`, `qemu.utils`, 7.2 to 10.x), implemented on vmpilot.

Opt in by putting `shim_path()` (printed by `vmpilot compat path`) first on
PYTHONPATH: it holds `qemu/machine`, `qemu/qmp` and `qemu/utils` packages that
re-export this package's code, so QEMU's test suites need nothing of QEMU's
`python/` tree. Nothing is shadowed unless you do that.
"""

from __future__ import annotations

import os


def shim_path() -> str:
    """The directory to put first on PYTHONPATH."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "shim")
