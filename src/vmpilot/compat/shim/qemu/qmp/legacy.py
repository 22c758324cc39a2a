"""qemu.qmp.legacy, provided by vmpilot."""

from vmpilot.compat.legacy import (  # noqa: F401
    QEMUMonitorProtocol,
    QMPBadPortError,
    QMPMessage,
    QMPReturnValue,
    SocketAddrT,
)
