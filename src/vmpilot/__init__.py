"""vmpilot: launch QEMU VMs, talk to them, and shut them down exactly as asked."""

from .errors import (
    AbnormalShutdown,
    AgentError,
    AgentGone,
    AgentTimeout,
    ChannelClosed,
    CommandError,
    ConfigError,
    ConsoleClosed,
    Disconnected,
    ExpectTimeout,
    GuestError,
    LaunchError,
    PackageError,
    ProtocolError,
    QMPError,
    QtestClosed,
    QtestError,
    Timeout,
    ValidationError,
    VMError,
)
from .machine import AsyncMachine, Drive, Machine, MachineConfig
from .qmp import AsyncQMPClient, Event, QMPClient

__version__ = "0.1.0"

__all__ = [
    "AbnormalShutdown",
    "AgentError",
    "AgentGone",
    "AgentTimeout",
    "AsyncMachine",
    "AsyncQMPClient",
    "ChannelClosed",
    "CommandError",
    "ConfigError",
    "ConsoleClosed",
    "Disconnected",
    "Drive",
    "Event",
    "ExpectTimeout",
    "GuestError",
    "LaunchError",
    "Machine",
    "MachineConfig",
    "PackageError",
    "ProtocolError",
    "QMPClient",
    "QMPError",
    "QtestClosed",
    "QtestError",
    "Timeout",
    "VMError",
    "ValidationError",
    "__version__",
]
