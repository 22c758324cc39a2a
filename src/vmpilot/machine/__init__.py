"""One VM: its description (config), its process, and its lifecycle."""

from .config import ConfigError, Drive, MachineConfig, detect_accel
from .machine import AsyncMachine, Machine

__all__ = ["AsyncMachine", "ConfigError", "Drive", "Machine", "MachineConfig", "detect_accel"]
