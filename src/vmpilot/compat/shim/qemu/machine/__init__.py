"""qemu.machine, provided by vmpilot (see `vmpilot compat path`)."""

from vmpilot.compat.machine import (
    AbnormalShutdown,
    QEMUMachine,
    QEMUMachineAddDeviceError,
    QEMUMachineError,
    VMLaunchFailure,
)
from vmpilot.compat.qtest import QEMUQtestMachine, QEMUQtestProtocol

__all__ = [
    "AbnormalShutdown",
    "QEMUMachine",
    "QEMUMachineAddDeviceError",
    "QEMUMachineError",
    "QEMUQtestMachine",
    "QEMUQtestProtocol",
    "VMLaunchFailure",
]
