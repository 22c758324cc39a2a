"""`Machine` (blocking) and `AsyncMachine` (asyncio): one VM each, with the
shutdown contract of DESIGN.md:

- `shutdown()` is graceful (QMP `quit`, or ACPI power-down) and, if QEMU does
  not exit in time or QMP fails, kills it and raises `AbnormalShutdown`;
- `wait()` sends nothing; a VM that does not exit in time is killed and the
  call raises;
- `kill()` is hard on purpose and raises nothing;
- the post-shutdown step runs exactly once, on every path.

The package is split as `qmp/` is: `lifecycle` (the state machine and
process), `argv` (the command line), `_plans` (each operation, written once),
`_common` (what both faces share), `sync` and `aio` (the two thin faces).
This module keeps the old import path.
"""

from __future__ import annotations

from ..errors import LaunchError
from ._common import (
    AGENT_TIMEOUT,
    COMMAND_TIMEOUT,
    LAUNCH_TIMEOUT,
    SHUTDOWN_TIMEOUT,
    WAIT_TIMEOUT,
)
from ._common import Common as _Common
from ._plans import Method
from .aio import AsyncMachine
from .sync import Machine

__all__ = [
    "AGENT_TIMEOUT",
    "COMMAND_TIMEOUT",
    "LAUNCH_TIMEOUT",
    "SHUTDOWN_TIMEOUT",
    "WAIT_TIMEOUT",
    "AsyncMachine",
    "LaunchError",
    "Machine",
    "Method",
    "_Common",
]
