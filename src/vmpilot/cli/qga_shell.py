"""`vmpilot qga SOCKET`: the QMP shell's front end for a guest agent.

The same syntax, `-c`, exit status, transcript and JSON output as `vmpilot
qmp`, on the agent's socket (QEMU's `-chardev socket,path=SOCKET,server=on,
wait=off,id=qga0 -device virtio-serial-pci -device virtserialport,
chardev=qga0,name=org.qemu.guest_agent.0`). The agent publishes no schema,
only the names of the commands it supports (`guest-info`): those complete,
and a name it does not know, or has disabled, is refused before it is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import os
import socket
import sys
from typing import Any

from .._util.deadline import Deadline
from ..errors import AgentGone, ValidationError
from ..machine._common import AGENT_TIMEOUT  # the agent starts late in the guest's boot
from ..qga import AsyncGuestAgent
from .qmp_shell import Shell, _Transcript, interactive, run_commands, state_dir
from .qmp_syntax import Command


class AgentBackend:
    """The guest agent side of the shell: `guest-info` names the commands."""

    history_name = "qga-history"

    def __init__(self, agent: AsyncGuestAgent, info: dict[str, Any], timeout: float) -> None:
        self.agent = agent
        self.timeout = timeout
        listed = info.get("supported_commands", [])
        self.enabled = sorted(c["name"] for c in listed if c.get("enabled", True))
        self.disabled = {c["name"] for c in listed if not c.get("enabled", True)}
        self.no_answer = {c["name"] for c in listed if c.get("success-response") is False}
        self.gone = False  # the channel closed: the interactive loop ends

    def check(self, command: Command) -> None:
        name = command.name
        if name in self.disabled:
            raise ValidationError(f"the agent has {name!r} disabled")
        if name not in self.enabled:
            close = difflib.get_close_matches(name, self.enabled, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValidationError(f"the agent has no command {name!r}{hint}")
        if name in self.no_answer and name != "guest-shutdown":
            raise ValidationError(f"{name!r} sends no answer: not supported by this shell")

    async def execute(self, command: Command) -> Any:
        try:
            if command.name == "guest-shutdown":  # no answer on success
                mode = (command.arguments or {}).get("mode", "powerdown")
                await self.agent.shutdown(mode, timeout=self.timeout)
                return {}
            return await self.agent.execute(command.name, command.arguments, timeout=self.timeout)
        except AgentGone:
            self.gone = True
            raise

    def completions(self, text: str, in_transaction: bool) -> list[tuple[str, int]]:
        if " " in text.lstrip():
            return []  # the agent describes no arguments
        word = text.lstrip()
        return [(name, len(word)) for name in self.enabled if name.startswith(word)]


def _connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise AgentGone(f"cannot connect to the guest agent at {path}: {exc}") from None
    return sock


async def qga_main(args: argparse.Namespace) -> int:
    log = _Transcript(args.log)
    agent = AsyncGuestAgent(_connect(args.target, args.timeout), name=args.target)
    try:
        deadline = Deadline.of(args.timeout)
        await agent.sync(timeout=deadline)
        info = await agent.info(timeout=deadline)
        backend = AgentBackend(agent, info, args.timeout)
        shell = Shell(backend, log, sys.stdout, name="QGA", validate=not args.no_validate,
                      verbose=args.verbose)  # fmt: skip
        if args.command:
            return await run_commands(shell, args.command)
        banner = (
            f"Connected to the guest agent {info.get('version', '?')} at {args.target}; "
            "Ctrl-D to leave."
        )
        return await interactive(shell, banner, lambda: backend.gone)
    finally:
        agent.close()
        log.close()


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "qga",
        help="interactive guest agent shell",
        description="Talk to a QEMU guest agent (qemu-ga) through its unix socket on the "
        "host. Input as in `vmpilot qmp`: `guest-command key=value ...` or a JSON "
        "object; command names complete from the agent's guest-info. History is kept "
        f"in {os.path.join(state_dir(), 'qga-history')}.",
    )
    p.add_argument("target", metavar="SOCKET", help="the agent's unix socket path")
    p.add_argument("-c", dest="command", action="append", metavar="CMD",
                   help="run CMD and exit (repeatable); exit status 1 if any failed")  # fmt: skip
    p.add_argument("--log", metavar="FILE", help="append a JSON-lines transcript to FILE")
    p.add_argument("--no-validate", action="store_true",
                   help="send commands the agent did not list")  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true",
                   help="echo each command as the JSON sent")  # fmt: skip
    p.add_argument("--timeout", type=float, default=AGENT_TIMEOUT,
                   help="wait this long for the agent, and for each answer (s)")  # fmt: skip
    p.set_defaults(func=lambda a: asyncio.run(qga_main(a)))
