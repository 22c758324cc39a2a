"""qemu.utils.accel, provided by vmpilot."""

from vmpilot.compat.utils import kvm_available, list_accel, tcg_available  # noqa: F401
