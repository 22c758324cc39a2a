"""Drop-in compatibility with QEMU's in-tree `qemu.machine` and
`qemu.qmp.legacy`, implemented on vmpilot.

Opt in by putting `shim_path()` (printed by `vmpilot compat path`) first on
PYTHONPATH: it holds `qemu/machine` and `qemu/qmp` packages that re-export
this package's classes. Nothing is shadowed unless you do that.
"""

from __future__ import annotations

import os


def shim_path() -> str:
    """The directory to put first on PYTHONPATH."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "shim")
