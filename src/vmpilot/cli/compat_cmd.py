"""`vmpilot compat path`: where the qemu.machine compatibility shim is."""

from __future__ import annotations

import argparse

from ..compat import shim_path


def _path(args: argparse.Namespace) -> int:
    print(shim_path())
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "compat",
        help="the qemu.machine / qemu.qmp.legacy / qemu.utils compatibility shim",
        description="vmpilot can stand in for QEMU's in-tree Python library. Opt in with "
        'PYTHONPATH="$(vmpilot compat path):$PYTHONPATH".',
    )
    csub = p.add_subparsers(dest="compat_command", metavar="ACTION", required=True)
    c = csub.add_parser("path", help="print the directory to put first on PYTHONPATH")
    c.set_defaults(func=_path)
