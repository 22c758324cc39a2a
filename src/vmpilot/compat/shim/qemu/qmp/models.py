"""qemu.qmp.models, provided by vmpilot: the parsed error reply of `ExecuteError.error`."""

from vmpilot.compat.legacy import ErrorInfo, ErrorResponse  # noqa: F401
