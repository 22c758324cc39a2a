"""qemu.qmp.qmp_client, provided by vmpilot: the error classes suites catch.
The asyncio `QMPClient` is not provided: use `vmpilot.qmp.AsyncQMPClient`."""

from vmpilot.compat.legacy import ExecuteError  # noqa: F401
from vmpilot.errors import Disconnected as ExecInterruptedError  # noqa: F401
from vmpilot.errors import QMPError  # noqa: F401

from . import _not_provided

__getattr__ = _not_provided(__name__)
