"""`vmpilot qmp TARGET`: an interactive QMP shell, and `vmpilot events TARGET`.

Input is qmp-shell's syntax (see `qmp_syntax`): `command key=value ...` with
JSON values and nested keys, a raw JSON command object, or `transaction(` ...
`)`. Every command is checked against the connected QEMU's schema before it is
sent ("did you mean ...?"). With prompt_toolkit installed (`pip install
'vmpilot[shell]'`) command names, argument names and enum values complete from
that schema; without it a plain prompt is used. Events are printed as they
arrive. The `Shell` here also serves the guest agent (`qga_shell`) through
another `Backend`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TextIO

from ..errors import AgentError, CommandError, Disconnected, ValidationError, VMError
from ..qmp import AsyncQMPClient, Event
from ..qmp.schema import Member, Schema
from .qmp_syntax import Command, ParseError, Reader, coerce, parse_arguments, split_words


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


class Backend(Protocol):
    """What differs between the QMP shell and the guest-agent shell."""

    history_name: str  # file in the state directory

    def check(self, command: Command) -> None:
        """Raise `ValidationError` for a command that cannot be right; may
        fix up `command` (bare words to strings where the schema says so)."""

    async def execute(self, command: Command) -> Any:
        """Send; the result, or `CommandError`/`AgentError`/another `VMError`."""

    def completions(self, text: str, in_transaction: bool) -> list[tuple[str, int]]:
        """(candidate, how many characters before the cursor it replaces)."""


def hmp_error(output: str) -> str | None:
    """The line of HMP's text output that reports an error, if one does.

    HMP answers every command with text (the QMP reply is a success), so errors
    are recognised by the forms QEMU 7.2 to 10.0 print: `unknown command: 'x'`,
    `Error: ...` (an `Error *` reported by the command), and an argument parse
    failure followed by `Try "help x" for more information`."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("unknown command:", "Error: ")):
            return line
        if line.startswith('Try "help') and line.endswith('" for more information'):
            return lines[i - 1] if i else line
    return None


class Shell:
    """Reads lines, validates, sends, prints; one per connection."""

    def __init__(
        self, backend: Backend, log: _Transcript, out: TextIO, *, hmp: bool = False,
        validate: bool = True, name: str = "QEMU", verbose: bool = False,
    ) -> None:  # fmt: skip
        self.name = name
        self.verbose = verbose
        self.backend = backend
        self.log = log
        self.out = out
        self.hmp = hmp
        self.validate = validate
        self.reader = Reader()

    @property
    def prompt(self) -> str:
        if self.reader.in_transaction:
            return "TRANS> "
        return "(HMP) " if self.hmp else f"({self.name}) "

    def _error(self, message: str) -> bool:
        print(f"error: {message}", file=self.out, flush=True)
        return False

    async def run_line(self, line: str) -> bool:
        """Execute one input line (or add it to the open transaction); print
        the answer; True on success."""
        if self.hmp and not line.lstrip().startswith("{"):
            commands = [Command("human-monitor-command", {"command-line": line})]
        else:
            try:  # a transaction is checked as each line of actions is typed
                commands = self.reader.feed(line, self.backend.check if self.validate else None)
            except (ParseError, ValidationError) as exc:
                return self._error(str(exc))
        ok = True
        for command in commands:
            ok = await self._run(command) and ok
        return ok

    async def finish(self) -> bool:
        """End of input: an open transaction is an error (nothing was sent)."""
        if self.reader.in_transaction:
            self.reader.cancel()
            return self._error("transaction( was not closed with ')': nothing sent")
        return True

    async def _run(self, command: Command) -> bool:
        if self.validate:
            try:
                self.backend.check(command)
            except ValidationError as exc:
                return self._error(f"{exc} (not sent)")
        sent = {"execute": command.name, "arguments": command.arguments}
        if self.verbose:
            print(json.dumps({k: v for k, v in sent.items() if v is not None}), file=self.out)
        self.log.write("command", sent)
        try:
            result = await self.backend.execute(command)
        except (CommandError, AgentError) as exc:
            self.log.write("error", {"class": exc.error_class, "desc": exc.desc})
            return self._error(f"{exc.error_class}: {exc.desc}")
        except VMError as exc:
            return self._error(str(exc))
        self.log.write("return", result)
        if self.hmp and isinstance(result, str):
            print(result.replace("\r\n", "\n"), end="" if result.endswith("\n") else "\n",
                  file=self.out, flush=True)  # fmt: skip
            return hmp_error(result) is None
        print(json.dumps(result, indent=2), file=self.out, flush=True)
        return True


class QMPBackend:
    """The QMP side: the live schema validates and completes."""

    history_name = "qmp-history"

    def __init__(self, qmp: AsyncQMPClient, schema: Schema, hmp_commands: list[str]) -> None:
        self.qmp = qmp
        self.schema = schema
        self.hmp_commands = hmp_commands

    def check(self, command: Command) -> None:
        if command.name == "human-monitor-command":
            return
        coerce(self.schema, command)
        cmd = self.schema.commands.get(command.name)
        if cmd is not None:
            check_tags(self.schema, cmd.get("arg-type", ""), command.arguments or {}, command.name)
        self.schema.validate(command.name, command.arguments)

    async def execute(self, command: Command) -> Any:
        return await self.qmp.execute(command.name, command.arguments)

    def completions(self, text: str, in_transaction: bool) -> list[tuple[str, int]]:
        if self.hmp_commands:
            return [(c, len(text)) for c in self.hmp_commands if c.startswith(text)]
        return qmp_completions(self.schema, text, in_transaction)


def check_tags(schema: Schema, type_name: str, value: Any, where: str) -> None:
    """A union's tag (`driver=`, a transaction action's `type`) checked first:
    with a wrong tag, the schema's check would only complain about the
    arguments of the branch it could not select."""
    t = schema.types.get(type_name, {})
    if t.get("meta-type") == "array" and isinstance(value, list):
        for i, item in enumerate(value):
            check_tags(schema, t["element-type"], item, f"{where}[{i}]")
    if t.get("meta-type") != "object" or not isinstance(value, dict):
        return
    members = schema.members(type_name, value)
    tag = t.get("tag")
    if tag in value and tag in members:
        values = schema.enum_values(members[tag].type)
        if values and value[tag] not in values:
            close = difflib.get_close_matches(str(value[tag]), values, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValidationError(f"{where}.{tag} cannot be {value[tag]!r}{hint}")
    for name, member in members.items():
        if name in value and name != tag:
            check_tags(schema, member.type, value[name], f"{where}.{name}")


def _transaction_action(schema: Schema) -> str:
    actions = schema.arguments("transaction").get("actions")
    element = schema.types.get(actions.type, {}) if actions else {}
    return str(element.get("element-type", ""))


def transaction_types(schema: Schema) -> list[str]:
    """The action names `transaction` takes, from the schema."""
    action = _transaction_action(schema)
    tag = schema.members(action, {}).get("type")
    return schema.enum_values(tag.type) if tag else []


def _action_members(schema: Schema, name: str, given: dict[str, Any]) -> dict[str, Member]:
    action = _transaction_action(schema)
    data = schema.members(action, {"type": name}).get("data")
    return schema.members(data.type, given) if data else {}


def qmp_completions(schema: Schema, text: str, in_transaction: bool) -> list[tuple[str, int]]:
    """What the word before the cursor can become: a command (or transaction
    action) name, an argument name (those not given yet), or an enum value."""
    words = split_words(text, partial=True)
    if not words or text[-1:].isspace():
        words.append("")
    word = words[-1]
    opened = [i for i, w in enumerate(words[:-1]) if w in ("transaction(", ";")]
    if in_transaction or opened:
        start = opened[-1] + 1 if opened else 0
        words = words[start:]
        names = transaction_types(schema)
    else:
        names = schema.command_names()
    if len(words) == 1:
        return [(n, len(word)) for n in names if n.startswith(word)]
    try:
        given, _ = parse_arguments(words[1:-1])
    except ParseError:
        given = {}
    if in_transaction or opened:
        members = _action_members(schema, words[0], given)
    else:
        members = schema.arguments(words[0], given)
    key, eq, value = word.partition("=")
    if not eq:
        return [(n + "=", len(word)) for n in members if n.startswith(key) and n not in given]
    if key in members:
        values = schema.enum_values(members[key].type)
        return [(v, len(value)) for v in values if v.startswith(value)]
    return []


async def hmp_command_names(qmp: AsyncQMPClient) -> list[str]:
    """HMP's commands (and `info` topics), from its own `help` text."""
    names: list[str] = []
    for topic, prefix in (("help", ""), ("info", "info ")):
        text = await qmp.execute("human-monitor-command", {"command-line": topic})
        for line in str(text).splitlines():
            first = line.split(" ", 1)[0]
            if prefix:
                first = line.split(" ", 2)[1] if line.startswith("info ") else ""
            for name in first.split("|"):
                if name and name[0].isalpha() and name != "info":
                    names.append(prefix + name)
    return sorted(set(names))


def _toolkit_completer(backend: Backend, shell: Shell) -> Any:
    from prompt_toolkit.completion import Completer, Completion

    class ShellCompleter(Completer):
        def get_completions(self, document: Any, complete_event: Any) -> Iterable[Any]:
            found = backend.completions(document.text_before_cursor, shell.reader.in_transaction)
            for text, replaces in found:
                yield Completion(text, -replaces)

    return ShellCompleter()


async def interactive(shell: Shell, banner: str, closed: Callable[[], bool]) -> int:
    """The prompt loop: prompt_toolkit when installed, else `input()`."""
    history = os.path.join(_private_state_dir(), shell.backend.history_name)
    _private_history(history)
    print(banner, flush=True)
    use_toolkit = _has_prompt_toolkit() and not os.environ.get("VMPILOT_PLAIN_PROMPT")
    if use_toolkit:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory
        from prompt_toolkit.patch_stdout import patch_stdout

        session: Any = PromptSession(
            history=FileHistory(history),
            completer=_toolkit_completer(shell.backend, shell),
            complete_while_typing=False,
        )
        with patch_stdout(raw=True):
            while not closed():
                try:
                    line = await session.prompt_async(shell.prompt)
                except (EOFError, KeyboardInterrupt):
                    break
                if line.strip():
                    await shell.run_line(line)
        await shell.finish()
        return 0
    loop = asyncio.get_running_loop()
    with _readline_history(history):
        while not closed():
            try:
                line = await loop.run_in_executor(None, input, shell.prompt)
            except (EOFError, KeyboardInterrupt):
                print()
                break
            if line.strip():
                await shell.run_line(line)
    await shell.finish()
    return 0


async def run_commands(shell: Shell, lines: list[str]) -> int:
    """`-c` lines in order; exit status 1 if any failed (or left a transaction open)."""
    ok = True
    for line in lines:
        ok = await shell.run_line(line) and ok
    ok = await shell.finish() and ok
    return 0 if ok else 1


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
            schema = await qmp.fetch_schema()
            interactive_hmp = args.hmp and not args.command
            hmp_names = await hmp_command_names(qmp) if interactive_hmp else []
            backend = QMPBackend(qmp, schema, hmp_names)
            shell = Shell(backend, log, sys.stdout, hmp=args.hmp, validate=not args.no_validate,
                          verbose=args.verbose)  # fmt: skip
            if args.command:
                return await run_commands(shell, args.command)
            qmp.add_listener(lambda ev: print(format_event(ev), flush=True))
            greeting = qmp.greeting
            version = ".".join(map(str, greeting.qemu_version)) if greeting else "?"
            banner = f"Connected to QEMU {version} at {qmp.name}; Ctrl-D to leave."
            return await interactive(shell, banner, lambda: qmp.closed)
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
        "...` (JSON values; a.b=1 nests) or a JSON object; `transaction(` ... `)` sends "
        "actions as one transaction. Commands are checked against QEMU's schema before "
        "they are sent. History is kept in "
        f"{os.path.join(state_dir(), 'qmp-history')}.",
    )
    p.add_argument("target", help="unix socket path or host:port")
    p.add_argument("-c", dest="command", action="append", metavar="CMD",
                   help="run CMD and exit (repeatable); exit status 1 if any failed")  # fmt: skip
    p.add_argument("--hmp", action="store_true",
                   help="HMP mode; exit status 1 when HMP prints an error")  # fmt: skip
    p.add_argument("--no-validate", action="store_true",
                   help="send commands without checking them against the schema first")  # fmt: skip
    p.add_argument("--log", metavar="FILE", help="append a JSON-lines transcript to FILE")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="echo each command as the JSON sent (as qmp-shell -v)")  # fmt: skip
    p.add_argument("-p", "--pretty", action="store_true",
                   help="as qmp-shell -p (answers are always pretty-printed)")  # fmt: skip
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
