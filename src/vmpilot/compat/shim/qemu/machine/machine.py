"""qemu.machine.machine, provided by vmpilot."""

from vmpilot.compat.machine import (  # noqa: F401
    AbnormalShutdown,
    QEMUMachine,
    QEMUMachineAddDeviceError,
    QEMUMachineError,
    VMLaunchFailure,
)
