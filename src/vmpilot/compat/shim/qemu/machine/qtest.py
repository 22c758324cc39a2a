"""qemu.machine.qtest, provided by vmpilot."""

from vmpilot.compat.qtest import QEMUQtestMachine, QEMUQtestProtocol  # noqa: F401
