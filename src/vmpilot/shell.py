"""Run shell commands in the guest over its serial console.

Each command is bracketed by markers with a random token, typed so that the
tty's echo of the command line never contains them (`'VMP''B…'`): kernel
messages or the echo interleaving with the output cannot be mistaken for the
end of the command. A timed-out command is interrupted and the shell
resynchronised, so the next command works; errors show the command as typed,
never the markers (`scrub`).

The operations are plans (see `_util.plan`) over the console's primitives,
composed with its `expect` plan; `Shell` and `AsyncShell` only run them on
their console.
"""

from __future__ import annotations

import re
import secrets
import shlex

from ._util.deadline import Deadline, Within
from ._util.plan import Call, Plan
from .console import ANSI, AsyncConsole, Console
from .console import plans as console_plans
from .console._base import ConsoleBase
from .console.core import visible
from .errors import ConsoleClosed, ExpectTimeout, GuestError, GuestPanicked

PROMPT = "guest# "
DEFAULT_TIMEOUT = 60.0  # seconds a shell command (or the prompt) may take unless told otherwise
RESYNC_TIMEOUT = 10.0  # seconds the shell gets to come back after a timed-out command's Ctrl-C
PANIC = "Kernel panic"
INTERRUPT = b"\x03"  # Ctrl-C: the tty sends SIGINT to the foreground job
TAIL = 2000  # console output shown in the shell's errors

# the markers as they appear on the console: the echoed script, and its output
_ECHO = re.compile(
    r"printf 'VMP''B([0-9a-f]+)\\n'; eval (.*?); printf '\\nVMP''E\1 %d\\n' \$\?"
    # a fragment: the resync line, typed over the interrupted one, echoed cut short
    r"|printf 'VMP[^\n]*|printf 'V?M?(?=\r?\n)"
    # ... or wrapped by the tty right after `printf `: its quoted marker alone
    r"|printf (?=\r?\n'VMP)|'VMP''[BS][0-9a-f]*\\n'"
)
_MARK = re.compile(r"VMP[BS][0-9a-f]+\r?\n|\r?\nVMPE[0-9a-f]+ \d+(?=\r?\n)")


class ShellTimeout(ExpectTimeout):
    """A command did not finish in time: it was interrupted (Ctrl-C) and the
    shell resynchronised. `command`, and `output` (what it printed so far)."""

    def __init__(self, message: str, command: str, output: str, timeout: float | None) -> None:
        super().__init__(message, repr(command), timeout)
        self.command = command
        self.output = output


def _script(command: str, token: str) -> str:
    if "\n" in command:
        raise ValueError("shell.run takes one line; join commands with ';' or '&&'")
    # one line, so the tty's echo of all of it comes before any output; eval
    # keeps the command's own syntax (a trailing '&' or ';') from mattering
    begin = f"printf 'VMP''B{token}\\n'"
    end = f"printf '\\nVMP''E{token} %d\\n' $?"
    return f"{begin}; eval {shlex.quote(command)}; {end}"


def _markers(token: str) -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
    begin = re.compile(rb"VMPB" + token.encode() + rb"\r?\n")
    end = re.compile(rb"\r?\nVMPE" + token.encode() + rb" (\d+)\r?\n")
    return begin, end


def _unquote(match: re.Match[str]) -> str:
    if match[2] is None:
        return ""
    try:
        return shlex.split(match[2])[0]
    except (ValueError, IndexError):
        return match[2]


def scrub(text: str) -> str:
    """Console output as a person should see it: the shell's markers gone
    (the typed command shows as itself), control characters escaped."""
    text = text.replace("\r\r\n", "")  # where busybox wrapped the echoed line at 80 columns
    return visible(_MARK.sub("", _ECHO.sub(_unquote, text)).replace("\r\n", "\n"))


def clean(output: bytes) -> str:
    """Command output as text: ANSI escapes stripped, CRLF made LF."""
    return (
        ANSI.sub(b"", output).replace(b"\r\n", b"\n").replace(b"\r", b"").decode(errors="replace")
    )


def _tail(con: ConsoleBase) -> str:
    return scrub(bytes(con._buf.recent).decode(errors="replace"))[-TAIL:]


# -- the plans (one deadline for the whole operation) -------------------------


def wait_ready_plan(con: ConsoleBase, prompt: str, deadline: Deadline) -> Plan[None]:
    """The plan of `wait_ready`: until `prompt` appears (a kernel panic fails it)."""
    yield from console_plans.expect(con, prompt, [PANIC], deadline)


def run_plan(con: ConsoleBase, command: str, deadline: Deadline) -> Plan[tuple[int, str]]:
    """Run `command`; on timeout interrupt it, resync, raise `ShellTimeout`.
    The shell's errors name the command, never its markers."""
    token = secrets.token_hex(6)
    begin, end = _markers(token)
    started = False
    try:
        yield Call("_send", (_script(command, token) + "\n").encode())
        yield from console_plans.expect(con, begin, None, deadline)
        started = True
        m = yield from console_plans.expect(con, end, None, deadline)
    except ExpectTimeout:
        output = clean(bytes(con._buf.data)) if started else ""
        recovered = yield from _interrupt(con)
        limit = deadline.timeout
        after = "" if limit is None else f" within {limit:g} s"
        state = (
            "it was interrupted (Ctrl-C) and the shell is ready again"
            if recovered
            else f"Ctrl-C did not bring the shell back within {RESYNC_TIMEOUT:g} s"
        )
        shown = output.rstrip() or ("(none)" if started else "(it had not started)")
        raise ShellTimeout(
            f"{command!r} did not finish{after} in the guest; {state}.\n"
            f"its output so far:\n{shown}\nlast console output:\n{_tail(con)}",
            command, output, limit,
        ) from None  # fmt: skip
    except GuestPanicked as exc:
        raise GuestPanicked(
            f"the guest kernel panicked while running {command!r}: {exc.panic}\n"
            f"last console output:\n{_tail(con)}",
            panic=exc.panic, console_tail=_tail(con),
        ) from None  # fmt: skip
    except ConsoleClosed as exc:
        why = con.closed_reason or exc
        raise ConsoleClosed(
            f"the console closed ({why}) while running {command!r}; "
            f"last console output:\n{_tail(con)}"
        ) from None
    return int(m.group(1)), clean(m.before)


def _interrupt(con: ConsoleBase) -> Plan[bool]:
    """Ctrl-C, then a fresh marker: everything up to it (the rest of the
    interrupted line's output, a late end marker) is dropped."""
    token = secrets.token_hex(6)
    mark = re.compile(rb"VMPS" + token.encode() + rb"\r?\n")
    deadline = Deadline(RESYNC_TIMEOUT)
    try:
        yield Call("_send", INTERRUPT)
        yield Call("_send", f"printf 'VMP''S{token}\\n'\n".encode())
        yield from console_plans.expect(con, mark, None, deadline)
    except (ExpectTimeout, ConsoleClosed):
        return False
    return True


def check_plan(con: ConsoleBase, command: str, deadline: Deadline) -> Plan[str]:
    """The plan of `check`: the output of `run`, or `GuestError` on a non-zero exit status."""
    status, output = yield from run_plan(con, command, deadline)
    if status != 0:
        raise GuestError(f"{command!r} exited with {status} in the guest:\n{output}")
    return output


class Shell:
    """`run(cmd)` → `(exit_status, output)` on the guest's console shell."""

    def __init__(self, console: Console, prompt: str = PROMPT) -> None:
        self.console = console
        self.prompt = prompt

    def wait_ready(self, *, timeout: Within = DEFAULT_TIMEOUT) -> None:
        """Wait for the shell prompt (after boot); a kernel panic fails at once."""
        self.console._perform(wait_ready_plan(self.console, self.prompt, Deadline.of(timeout)))

    def run(self, command: str, *, timeout: Within = DEFAULT_TIMEOUT) -> tuple[int, str]:
        """Run one command line; its exit status and output. Not done within
        `timeout`: it is interrupted (Ctrl-C), the shell resynchronised (up to
        `RESYNC_TIMEOUT` more), and `ShellTimeout` names it with its output so far."""
        return self.console._perform(run_plan(self.console, command, Deadline.of(timeout)))

    def check(self, command: str, *, timeout: Within = DEFAULT_TIMEOUT) -> str:
        """`run`, raising `GuestError` on a non-zero exit status."""
        return self.console._perform(check_plan(self.console, command, Deadline.of(timeout)))


class AsyncShell:
    """`Shell` for asyncio code."""

    def __init__(self, console: AsyncConsole, prompt: str = PROMPT) -> None:
        self.console = console
        self.prompt = prompt

    async def wait_ready(self, *, timeout: Within = DEFAULT_TIMEOUT) -> None:
        """See `Shell.wait_ready`."""
        plan = wait_ready_plan(self.console, self.prompt, Deadline.of(timeout))
        await self.console._perform(plan)

    async def run(self, command: str, *, timeout: Within = DEFAULT_TIMEOUT) -> tuple[int, str]:
        """See `Shell.run`."""
        return await self.console._perform(run_plan(self.console, command, Deadline.of(timeout)))

    async def check(self, command: str, *, timeout: Within = DEFAULT_TIMEOUT) -> str:
        """See `Shell.check`."""
        plan = check_plan(self.console, command, Deadline.of(timeout))
        return await self.console._perform(plan)
