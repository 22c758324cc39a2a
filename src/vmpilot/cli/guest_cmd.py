"""`vmpilot guest build|path|clean`: manage the bundled guest's cache."""

from __future__ import annotations

import argparse
import sys
import time

from .. import guest
from .._util.progress import Progress


def _build(args: argparse.Namespace) -> int:
    progress = Progress()
    t0 = time.perf_counter()
    with progress.phase("building the guest (from Debian packages)"):
        image = guest.build(progress=None if progress.enabled else _say)
    print(f"{image.path}  (Linux {image.kernel_release}, {time.perf_counter() - t0:.1f} s)")
    return 0


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _path(args: argparse.Namespace) -> int:
    image = guest.default()
    if args.what == "kernel":
        print(image.kernel)
    elif args.what == "initrd":
        print(image.initrd)
    else:
        print(image.path)
    return 0


def _clean(args: argparse.Namespace) -> int:
    removed = guest.clean()
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print("nothing to clean")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("guest", help="manage the bundled guest", description=__doc__)
    gsub = p.add_subparsers(dest="guest_command", metavar="ACTION", required=True)
    b = gsub.add_parser("build", help="build (or reuse) the bundled guest; print its directory")
    b.set_defaults(func=_build)
    pa = gsub.add_parser("path", help="print where the built guest is (building it if needed)")
    pa.add_argument("what", nargs="?", choices=["dir", "kernel", "initrd"], default="dir")
    pa.set_defaults(func=_path)
    c = gsub.add_parser("clean", help="remove cached guest builds and downloaded packages")
    c.set_defaults(func=_clean)
