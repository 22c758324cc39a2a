"""Entry point of the `vmpilot` command: argparse, one clear line per error."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import VMError
from . import compat_cmd, demo, guest_cmd, job_cmd, qga_shell, qmp_shell, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmpilot", description="Launch QEMU VMs, talk to them, shut them down as asked."
    )
    parser.add_argument("--version", action="version", version=f"vmpilot {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    demo.add_parser(sub)
    run.add_parser(sub)
    qmp_shell.add_parsers(sub)
    qga_shell.add_parser(sub)
    guest_cmd.add_parser(sub)
    compat_cmd.add_parser(sub)
    job_cmd.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.subcommand is None:
        parser.print_help()
        return 2
    try:
        rc: int = args.func(args)
    except VMError as exc:
        if args.debug:
            raise
        print(f"vmpilot: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return rc
