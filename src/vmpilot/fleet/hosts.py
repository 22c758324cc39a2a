"""The hosts of a fleet as the user names them, and how to reach each one.

`--vmpilot-hosts` takes what `ssh` takes (`host`, `user@host`, a config alias)
plus `host:port`, which ssh itself does not accept, so it becomes `-p port`.
`local` and `localhost` mean this machine: plain xdist workers, no ssh.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LOCAL_NAMES = ("local", "localhost")

# ssh never prompts, gives up connecting after 20 s, and gives up on a host
# that stops answering (network gone, host frozen) after about 15 s instead of
# waiting for TCP to notice.
SSH_OPTIONS = (
    "-o",
    "BatchMode=yes",
    "-o",
    "ConnectTimeout=20",
    "-o",
    "ServerAliveInterval=5",
    "-o",
    "ServerAliveCountMax=3",
)


@dataclass(frozen=True)
class Host:
    """One host of the fleet: `name` as given on the command line."""

    name: str

    @property
    def local(self) -> bool:
        return self.name in LOCAL_NAMES

    @property
    def dirname(self) -> str:
        """The name made safe as a directory name (for `--vmpilot-keep-logs`)."""
        return re.sub(r"[^\w.@-]+", "_", self.name)

    def ssh_args(self) -> list[str]:
        """ssh's arguments naming the host (options first)."""
        target, port = self.name, None
        m = re.fullmatch(r"(.+):(\d+)", self.name)
        if m:
            target, port = m.group(1), m.group(2)
        return [*SSH_OPTIONS, *(["-p", port] if port else []), target]


def parse_hosts(value: str) -> list[Host]:
    """`a,b,user@c:2222` → hosts; refuses empty names and duplicates."""
    names = [n.strip() for n in value.split(",")]
    if not names or any(not n for n in names):
        raise ValueError(f"--vmpilot-hosts: empty host name in {value!r}")
    bad = [n for n in names if any(c.isspace() for c in n) or "//" in n]
    if bad:
        raise ValueError(f"--vmpilot-hosts: not a host name: {bad[0]!r}")
    seen: set[str] = set()
    hosts = []
    for n in names:
        key = "local" if n in LOCAL_NAMES else n
        if key in seen:
            raise ValueError(f"--vmpilot-hosts: {n!r} is named twice")
        seen.add(key)
        hosts.append(Host(n))
    return hosts
