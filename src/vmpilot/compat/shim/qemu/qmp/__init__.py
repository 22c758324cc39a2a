"""qemu.qmp, provided by vmpilot: the names the legacy API and QEMUMachine
users import. The asyncio `qemu.qmp.QMPClient` API itself is not provided:
use `vmpilot.qmp.AsyncQMPClient`."""

from vmpilot.compat.legacy import ExecuteError, QMPBadPortError, SocketAddrT
from vmpilot.errors import Disconnected as ConnectError
from vmpilot.errors import Disconnected as ExecInterruptedError
from vmpilot.errors import QMPError

__all__ = [
    "ConnectError",
    "ExecInterruptedError",
    "ExecuteError",
    "QMPBadPortError",
    "QMPError",
    "SocketAddrT",
]


def _not_provided(module):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(
            f"{module}.{name} is not provided by the vmpilot compatibility shim "
            f"(only the legacy API is); use vmpilot.qmp.AsyncQMPClient, or drop the shim "
            f"from PYTHONPATH to use the real qemu.qmp"
        )

    return __getattr__


__getattr__ = _not_provided(__name__)
