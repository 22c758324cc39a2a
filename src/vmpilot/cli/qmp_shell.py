"""`vmpilot qmp TARGET`: an interactive QMP shell, and `vmpilot events TARGET`.

Input is `command key=value ...` (values are JSON when they parse as JSON,
strings otherwise; `a.b=1` nests), or a raw JSON command object. With
prompt_toolkit installed (`pip install 'vmpilot[shell]'`) command names,
argument names and enum values complete from the connected QEMU's own schema;
without it a plain prompt is used. Events are printed as they arrive.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import stat
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

from ..errors import CommandError, Disconnected, QMPError
from ..qmp import AsyncQMPClient, Event
from ..qmp.schema import Schema


class ParseError(ValueError):
    pass


def parse_line(line: str) -> tuple[str, dict[str, Any] | None]:
    """`cmd k=v ...` or a JSON object → (command, arguments)."""
    line = line.strip()
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ParseError(f"invalid JSON: {exc}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("execute"), str):
            raise ParseError('a JSON command needs "execute": "<name>"')
        given = obj.get("arguments")
        if given is not None and not isinstance(given, dict):
            raise ParseError('"arguments" must be a JSON object')
        return obj["execute"], given
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise ParseError(str(exc)) from None
    if not words:
        raise ParseError("empty command")
    args: dict[str, Any] = {}
    for word in words[1:]:
        key, sep, raw = word.partition("=")
        if not sep or not key:
            raise ParseError(f"expected key=value, got {word!r}")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        target: dict[str, Any] = args
        *parents, leaf = key.split(".")
        for p in parents:
            nested = target.setdefault(p, {})
            if not isinstance(nested, dict):
                raise ParseError(f"{key!r}: {p!r} is already a value")
            target = nested
        target[leaf] = value
    return words[0], args or None


def state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "vmpilot")


# The history and the transcript hold everything typed, secrets included:
# they are the user's alone (files 0600 in a 0700 directory).


def _private_state_dir() -> str:
    """`state_dir()`, created 0700, and tightened to 0700 if it is ours and wider."""
    path = state_dir()
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def _private_history(path: str) -> None:
    """Create the history file 0600 before readline or prompt_toolkit write it
    (they would use the umask), and tighten one that others could read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _open_transcript(path: str) -> TextIO:
    """Append to `path`, created 0600. A file that exists is the user's: its
    mode is kept, but a warning says when others can read what is typed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & 0o077:
        print(
            f"vmpilot: warning: {path} has mode {mode:04o}: others can read the transcript "
            f"(everything typed); `chmod 600 {path}` to keep it private",
            file=sys.stderr,
        )
    return os.fdopen(fd, "a")


def format_event(event: Event) -> str:
    return json.dumps({"event": event.name, "data": event.data, "timestamp": event.timestamp})


class _Transcript:
    def __init__(self, path: str | None) -> None:
        self._f: TextIO | None = _open_transcript(path) if path else None

    def write(self, kind: str, payload: Any) -> None:
        if self._f is not None:
            self._f.write(json.dumps({"t": round(time.time(), 6), kind: payload}) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


async def run_one(qmp: AsyncQMPClient, line: str, hmp: bool, log: _Transcript, out: TextIO) -> bool:
    """Execute one input line; print the answer; True on success."""
    args: dict[str, Any] | None
    try:
        if hmp and not line.lstrip().startswith("{"):
            name, args = "human-monitor-command", {"command-line": line}
        else:
            name, args = parse_line(line)
    except ParseError as exc:
        print(f"error: {exc}", file=out)
        return False
    log.write("command", {"execute": name, "arguments": args})
    try:
        result = await qmp.execute(name, args)
    except CommandError as exc:
        log.write("error", {"class": exc.error_class, "desc": exc.desc})
        print(f"error: {exc.error_class}: {exc.desc}", file=out)
        return False
    except QMPError as exc:
        print(f"error: {exc}", file=out)
        return False
    log.write("return", result)
    if hmp and isinstance(result, str):
        print(result, end="" if result.endswith("\n") else "\n", file=out)
    else:
        print(json.dumps(result, indent=2), file=out)
    return True


def _completer(schema: Schema) -> Any:
    from prompt_toolkit.completion import Completer, Completion

    class QMPCompleter(Completer):
        def get_completions(self, document: Any, complete_event: Any) -> Iterable[Any]:
            text = document.text_before_cursor
            words = text.split(" ")
            word = words[-1]
            if len(words) == 1:
                for name in schema.command_names():
                    if name.startswith(word):
                        yield Completion(name, -len(word))
                return
            try:
                _, given = parse_line(" ".join(words[:-1]))
            except ParseError:
                given = None
            members = schema.arguments(words[0], given)
            key, eq, value = word.partition("=")
            if not eq:
                for name in members:
                    if name.startswith(key) and name not in (given or {}):
                        yield Completion(name + "=", -len(word))
            elif key in members:
                for v in schema.enum_values(members[key].type):
                    if v.startswith(value):
                        yield Completion(v, -len(value))

    return QMPCompleter()


async def interactive(qmp: AsyncQMPClient, args: argparse.Namespace, log: _Transcript) -> int:
    history = os.path.join(_private_state_dir(), "qmp-history")
    _private_history(history)
    prompt = "(HMP) " if args.hmp else "(QEMU) "
    use_toolkit = _has_prompt_toolkit() and not os.environ.get("VMPILOT_PLAIN_PROMPT")
    qmp.add_listener(lambda ev: print(format_event(ev), flush=True))
    greeting = qmp.greeting
    version = ".".join(map(str, greeting.qemu_version)) if greeting else "?"
    print(f"Connected to QEMU {version} at {qmp.name}; Ctrl-D to leave.", flush=True)
    if use_toolkit:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory
        from prompt_toolkit.patch_stdout import patch_stdout

        schema = await qmp.fetch_schema()
        session: Any = PromptSession(
            history=FileHistory(history),
            completer=None if args.hmp else _completer(schema),
            complete_while_typing=False,
        )
        with patch_stdout(raw=True):
            while not qmp.closed:
                try:
                    line = await session.prompt_async(prompt)
                except (EOFError, KeyboardInterrupt):
                    break
                if line.strip():
                    await run_one(qmp, line, args.hmp, log, sys.stdout)
        return 0
    loop = asyncio.get_running_loop()
    with _readline_history(history):
        while not qmp.closed:
            try:
                line = await loop.run_in_executor(None, input, prompt)
            except (EOFError, KeyboardInterrupt):
                print()
                break
            if line.strip():
                await run_one(qmp, line, args.hmp, log, sys.stdout)
    return 0


def _has_prompt_toolkit() -> bool:
    try:
        import prompt_toolkit  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _readline_history(path: str) -> Any:
    try:
        import readline
    except ImportError:
        yield
        return
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            readline.write_history_file(path)


async def qmp_main(args: argparse.Namespace) -> int:
    log = _Transcript(args.log)
    try:
        async with AsyncQMPClient.connect(args.target, timeout=args.timeout) as qmp:
            if args.command:
                ok = True
                for line in args.command:
                    ok = await run_one(qmp, line, args.hmp, log, sys.stdout) and ok
                return 0 if ok else 1
            return await interactive(qmp, args, log)
    finally:
        log.close()


async def events_main(args: argparse.Namespace) -> int:
    names = set(args.name) if args.name else None
    seen = 0
    async with AsyncQMPClient.connect(args.target) as qmp:
        print(f"vmpilot: connected to {qmp.name}; waiting for events", file=sys.stderr, flush=True)
        while args.count is None or seen < args.count:
            try:
                event = await qmp.wait_event(names, timeout=args.timeout)
            except Disconnected:
                break
            print(format_event(event), flush=True)
            seen += 1
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "qmp",
        help="interactive QMP shell",
        description="Talk to QEMU over QMP. TARGET is a unix socket path or host:port "
        "(QEMU started with -qmp unix:PATH,server=on,wait=off). Input: `command key=value "
        "...` (JSON values; a.b=1 nests) or a JSON object. History is kept in "
        f"{os.path.join(state_dir(), 'qmp-history')}.",
    )
    p.add_argument("target", help="unix socket path or host:port")
    p.add_argument("-c", dest="command", action="append", metavar="CMD",
                   help="run CMD and exit (repeatable); exit status 1 if any failed")  # fmt: skip
    p.add_argument("--hmp", action="store_true", help="HMP mode (human-monitor-command)")
    p.add_argument("--log", metavar="FILE", help="append a JSON-lines transcript to FILE")
    p.add_argument("--timeout", type=float, default=60.0, help="per-command timeout (s)")
    p.set_defaults(func=lambda a: asyncio.run(qmp_main(a)))

    e = sub.add_parser(
        "events",
        help="print QMP events as JSON lines",
        description="Print QEMU's events as they arrive, one JSON object per line, until "
        "the connection closes (or --count events).",
    )
    e.add_argument("target", help="unix socket path or host:port")
    e.add_argument("--name", action="append", help="only this event (repeatable)")
    e.add_argument("--count", type=int, help="stop after this many events")
    e.add_argument(
        "--timeout", type=float, default=None, help="give up after this many quiet seconds"
    )
    e.set_defaults(func=lambda a: asyncio.run(events_main(a)))
