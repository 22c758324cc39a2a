"""qemu.qmp.protocol, provided by vmpilot: the names QEMUMachine users import."""

from vmpilot.compat.legacy import SocketAddrT  # noqa: F401
from vmpilot.errors import Disconnected as ConnectError  # noqa: F401

from . import _not_provided

__getattr__ = _not_provided(__name__)
