"""vmpilot: launch QEMU VMs, talk to them, and shut them down exactly as asked."""

from .errors import (
    AbnormalShutdown,
    CommandError,
    Disconnected,
    GuestError,
    LaunchError,
    ProtocolError,
    QMPError,
    Timeout,
    VMError,
)
from .machine import AsyncMachine, ConfigError, Drive, Machine, MachineConfig
from .qmp import AsyncQMPClient, Event, QMPClient

__version__ = "0.1.0"

__all__ = [
    "AbnormalShutdown",
    "AsyncMachine",
    "AsyncQMPClient",
    "CommandError",
    "ConfigError",
    "Disconnected",
    "Drive",
    "Event",
    "GuestError",
    "LaunchError",
    "Machine",
    "MachineConfig",
    "ProtocolError",
    "QMPClient",
    "QMPError",
    "Timeout",
    "VMError",
    "__version__",
]
