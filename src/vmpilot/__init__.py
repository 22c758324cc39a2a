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
from .qmp import AsyncQMPClient, Event, QMPClient

__version__ = "0.1.0"

__all__ = [
    "AbnormalShutdown",
    "AsyncQMPClient",
    "CommandError",
    "Disconnected",
    "Event",
    "GuestError",
    "LaunchError",
    "ProtocolError",
    "QMPClient",
    "QMPError",
    "Timeout",
    "VMError",
    "__version__",
]
