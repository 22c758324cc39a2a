"""Run shell commands in the guest over its serial console.

Each command is bracketed by markers with a random token, typed so that the
tty's echo of the command line never contains them (`'VMP''B…'`): kernel
messages or the echo interleaving with the output cannot be mistaken for the
end of the command.
"""

from __future__ import annotations

import re
import secrets
import shlex

from .console import ANSI, AsyncConsole, Console
from .errors import GuestError

PROMPT = "guest# "
DEFAULT_TIMEOUT = 60.0


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


class Shell:
    """`run(cmd)` → `(exit_status, output)` on the guest's console shell."""

    def __init__(self, console: Console, prompt: str = PROMPT) -> None:
        self.console = console
        self.prompt = prompt

    def wait_ready(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Wait for the shell prompt (after boot)."""
        self.console.expect(self.prompt, timeout, fail=["Kernel panic"])

    def run(self, command: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, str]:
        token = secrets.token_hex(6)
        begin, end = _markers(token)
        self.console.send_line(_script(command, token))
        self.console.expect(begin, timeout)
        m = self.console.expect(end, timeout)
        return int(m.group(1)), clean(m.before)

    def check(self, command: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """`run`, raising `GuestError` on a non-zero exit status."""
        status, output = self.run(command, timeout)
        if status != 0:
            raise GuestError(f"{command!r} exited with {status} in the guest:\n{output}")
        return output


class AsyncShell:
    """`Shell` for asyncio code."""

    def __init__(self, console: AsyncConsole, prompt: str = PROMPT) -> None:
        self.console = console
        self.prompt = prompt

    async def wait_ready(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        await self.console.expect(self.prompt, timeout, fail=["Kernel panic"])

    async def run(self, command: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, str]:
        token = secrets.token_hex(6)
        begin, end = _markers(token)
        self.console.send_line(_script(command, token))
        await self.console.expect(begin, timeout)
        m = await self.console.expect(end, timeout)
        return int(m.group(1)), clean(m.before)

    async def check(self, command: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        status, output = await self.run(command, timeout)
        if status != 0:
            raise GuestError(f"{command!r} exited with {status} in the guest:\n{output}")
        return output
