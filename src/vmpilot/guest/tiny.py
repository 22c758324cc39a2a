"""The tiny firmware guest: a 64 KiB `-bios` image that QEMU starts in ~30 ms.

For console and power-down tests where a real kernel adds nothing. On COM1 it
prints `TINY-GUEST READY`, echoes every byte, exits QEMU through
isa-debug-exit on `~` + byte N (status (N<<1)|1), wedges itself on `!`
(ignores everything but SIGKILL), and on the ACPI power button (pc/q35) prints
`POWER BUTTON` and enters S5, so QEMU exits 0. It busy-polls: a live tiny
guest keeps one host core busy.
"""

from __future__ import annotations

import os
from typing import Any

from ..machine.config import MachineConfig

READY = "TINY-GUEST READY"

# Real-mode machine code of ../shared/guest/asm/tiny16.s (the measured recipe),
# position independent, followed by its two strings.
_CODE = (
    bytes.fromhex(
        "fa0e1f66b8400b008066bb01060000e88d0066b8800b008066bb01000000e87e0066b840f800"
        "8066bb01060000e86f0066b844f8008066bb80000000e86000ba0206b80001efe800005b8db7"
        "6400e84200e814003c7e74073c217408eeebf2e80600e6f4faf4ebfcba0006ed83f8ff7405a9"
        "0001750dbafd03eca80174eabaf803ecc38db77700e80900ba0406b80020efebd1baf803ac84"
        "c07403eeebf8c3baf80c66efbafc0c6689d866efc3"
    )
    + b"TINY-GUEST READY\r\n\0POWER BUTTON\r\n\0"
)


def bios_image() -> bytes:
    """64 KiB ROM: the code at offset 0, `ljmp $0xf000,$0` at the reset vector."""
    rom = bytearray(b"\xff" * 0x10000)
    rom[: len(_CODE)] = _CODE
    rom[0xFFF0:0xFFF5] = b"\xea\x00\x00\x00\xf0"
    return bytes(rom)


def write(directory: str) -> str:
    """Write the image into `directory`; returns its path."""
    path = os.path.join(directory, "tiny-bios.bin")
    with open(path, "wb") as f:
        f.write(bios_image())
    return path


def config(bios: str, **overrides: Any) -> MachineConfig:
    """A `MachineConfig` booting the tiny guest with console and isa-debug-exit."""
    values: dict[str, Any] = dict(
        machine="q35",
        memory=16,
        bios=bios,
        serial=True,
        devices=["isa-debug-exit,iobase=0xf4,iosize=4"],
    )
    values.update(overrides)
    return MachineConfig(**values)
