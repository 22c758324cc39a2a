"""vmpilot: launch QEMU VMs, talk to them, and shut them down exactly as asked."""

from .errors import (
    AbnormalShutdown,
    AgentError,
    AgentGone,
    AgentTimeout,
    ChannelClosed,
    CommandError,
    ConsoleClosed,
    Disconnected,
    ExpectTimeout,
    GuestError,
    LaunchError,
    ProtocolError,
    QMPError,
    QtestClosed,
    QtestError,
    Timeout,
    VMError,
)
from .machine import AsyncMachine, ConfigError, Drive, Machine, MachineConfig
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
    "ProtocolError",
    "QMPClient",
    "QMPError",
    "QtestClosed",
    "QtestError",
    "Timeout",
    "VMError",
    "__version__",
]
