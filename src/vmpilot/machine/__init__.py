"""One VM: its description (config), its process, and its lifecycle.

The shape, as `qmp/` has it: `config` (what to run, validated), `argv` (the
one pure function that writes QEMU's command line, every value escaped),
`lifecycle` (a state machine with a transition table, the temp dir, the
post-shutdown step), `process` (spawning and reaping QEMU), `_plans` (launch,
shutdown, wait and kill, each written once as a generator of primitive
calls) and two thin faces that supply the primitives: `sync.Machine`
(blocking, a pidfd watcher thread) and `aio.AsyncMachine` (asyncio, the
pidfd on the event loop). Channels (QMP, console, agent, qtest) are objects
of their own modules that the faces wire to QEMU's socketpairs.
"""

from .aio import AsyncMachine
from .config import ConfigError, Drive, MachineConfig, Share, detect_accel
from .qtest_machine import QtestMachine
from .sync import Machine

__all__ = [
    "AsyncMachine",
    "ConfigError",
    "Drive",
    "Machine",
    "MachineConfig",
    "QtestMachine",
    "Share",
    "detect_accel",
]
