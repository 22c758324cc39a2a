"""Run shell commands in the guest over its serial console.

Each command is bracketed by markers with a random token, typed so that the
tty's echo of the command line never contains them (`'VMP''B…'`): kernel
messages or the echo interleaving with the output cannot be mistaken for the
end of the command.

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
from .errors import GuestError

PROMPT = "guest# "
DEFAULT_TIMEOUT = 60.0  # seconds a shell command (or the prompt) may take unless told otherwise
PANIC = "Kernel panic"


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


def clean(output: bytes) -> str:
    """Command output as text: ANSI escapes stripped, CRLF made LF."""
    return (
        ANSI.sub(b"", output).replace(b"\r\n", b"\n").replace(b"\r", b"").decode(errors="replace")
    )


# -- the plans (one deadline for the whole operation) -------------------------


def wait_ready_plan(con: ConsoleBase, prompt: str, deadline: Deadline) -> Plan[None]:
    """The plan of `wait_ready`: until `prompt` appears (a kernel panic fails it)."""
    yield from console_plans.expect(con, prompt, [PANIC], deadline)


def run_plan(con: ConsoleBase, command: str, deadline: Deadline) -> Plan[tuple[int, str]]:
    """The plan of `run`: type one command line between markers; its exit status and output."""
    token = secrets.token_hex(6)
    begin, end = _markers(token)
    yield Call("_send", (_script(command, token) + "\n").encode())
    yield from console_plans.expect(con, begin, None, deadline)
    m = yield from console_plans.expect(con, end, None, deadline)
    return int(m.group(1)), clean(m.before)


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
        """Run one command line; its exit status and output."""
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
