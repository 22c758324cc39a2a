"""The bundled guests: a tiny Linux built from Debian packages, and a tiny
firmware image for tests that need no kernel."""

from . import tiny
from .build import PROMPT, READY, GuestImage, build, clean, default, for_kernel
from .deb import PackageError

__all__ = [
    "PROMPT",
    "READY",
    "GuestImage",
    "PackageError",
    "build",
    "clean",
    "default",
    "for_kernel",
    "tiny",
]
