"""qemu.qmp.error, provided by vmpilot."""

from vmpilot.errors import QMPError  # noqa: F401
