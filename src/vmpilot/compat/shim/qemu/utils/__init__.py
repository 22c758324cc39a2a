"""qemu.utils, provided by vmpilot (see `vmpilot compat path`): what QEMU's
test suites import. QEMU's command-line tools (qom, qemu_ga_client) are not
provided."""

from vmpilot.compat.utils import (
    VerboseProcessError,
    add_visual_margin,
    get_info_usernet_hostfwd_port,
    kvm_available,
    list_accel,
    tcg_available,
)

__all__ = [
    "VerboseProcessError",
    "add_visual_margin",
    "get_info_usernet_hostfwd_port",
    "kvm_available",
    "list_accel",
    "tcg_available",
]
