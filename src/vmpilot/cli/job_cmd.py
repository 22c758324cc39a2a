"""`vmpilot job TARGET COMMAND key=value ...`: run one QEMU job to its end.

TARGET is a QMP socket (a unix path or host:port: `vmpilot run
--expose-qmp`, or QEMU's own `-qmp unix:PATH,server=on,wait=off`); COMMAND
is any job-creating command (blockdev-backup, blockdev-mirror, block-stream,
block-commit, blockdev-create, snapshot-save, ...) with its arguments typed
as in `vmpilot qmp` (values are JSON when they parse, `a.b=1` nests). The job
is followed by `Machine.run_job`'s own plan: on a terminal a progress bar
shows how far it is; the result is printed as one JSON line; a failed job
exits 1 with QEMU's error text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import TextIO

from .._util.deadline import Deadline
from .._util.plan import run
from ..machine import jobs
from ..machine._qmp_ops import SyncOps
from ..qmp import QMPClient
from .qmp_syntax import ParseError, parse_line

BAR_WIDTH = 30


class Bar:
    """`[######......]  42%  27.0 of 64.0 MiB  3.1 s` redrawn in place."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream = stream
        self.label = label
        self.t0 = time.monotonic()
        self.drawn = False

    def __call__(self, current: int, total: int) -> None:
        frac = current / total if total else 0.0
        filled = int(frac * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        size = f"{current / 2**20:.1f} of {total / 2**20:.1f} MiB"
        took = time.monotonic() - self.t0
        self.stream.write(f"\r\x1b[K{self.label} [{bar}] {frac:4.0%}  {size}  {took:.1f} s")
        self.stream.flush()
        self.drawn = True

    def end(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def _main(args: argparse.Namespace) -> int:
    try:
        parsed = parse_line(" ".join([args.command, *args.arguments]))
        command, arguments = parsed.name, parsed.arguments
    except ParseError as exc:
        print(f"vmpilot: error: {exc}", file=sys.stderr)
        return 2
    show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    bar = Bar(sys.stderr, command) if show else None
    with QMPClient.connect(args.target) as qmp:
        plan = jobs.run_job(
            qmp, command, arguments, Deadline(args.timeout), bar, not args.no_complete
        )
        try:
            job = run(plan, SyncOps())
        finally:
            if bar is not None:
                bar.end()
    print(json.dumps(dataclasses.asdict(job)))
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "job",
        help="run a QEMU job (backup, mirror, stream, commit, create, snapshot) to its end",
        description="Start a job-creating QMP command and follow the job to its end "
        "(a mirror is completed at READY), with a progress bar on a terminal. Example: "
        "vmpilot job /tmp/qmp.sock blockdev-backup device=disk target=copy sync=full",
    )
    p.add_argument("target", help="QMP unix socket path or host:port")
    p.add_argument("command", help="the job-creating QMP command")
    p.add_argument("arguments", nargs="*", metavar="key=value", help="its arguments")
    p.add_argument("--timeout", type=float, default=jobs.JOB_TIMEOUT,
                   help="cancel the job after this many seconds (default %(default)s)")  # fmt: skip
    p.add_argument("--no-complete", action="store_true",
                   help="leave a mirror running at READY instead of completing it")  # fmt: skip
    p.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   help="progress bar on stderr (auto: when it is a terminal)")  # fmt: skip
    p.set_defaults(func=_main)
