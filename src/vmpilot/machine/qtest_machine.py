"""`QtestMachine`: a `Machine` under `-accel qtest` with `vm.qtest` connected.

It lives here, above `vmpilot.qtest` (the channel), which re-exports it
lazily so that the channel never imports the machine."""

from __future__ import annotations

from typing import Any

from ..errors import LaunchError
from ..qtest import qtest_available
from ._common import LAUNCH_TIMEOUT
from .config import MachineConfig
from .sync import Machine


class QtestMachine(Machine):
    """`Machine(accel="qtest", qtest=True)` that refuses clearly when the
    QEMU binary lacks the qtest accelerator."""

    def __init__(self, config: MachineConfig | None = None, **overrides: Any) -> None:
        overrides.setdefault("accel", "qtest")
        overrides["qtest"] = True
        super().__init__(config, **overrides)

    def launch(self, *, timeout: float | None = LAUNCH_TIMEOUT) -> QtestMachine:
        qemu = self.config.resolve_qemu()
        if not qtest_available(qemu):
            raise LaunchError(
                f"{qemu} was built without the qtest accelerator (it does not start with "
                f"`-accel qtest`; Debian's packages delete that module); use a QEMU built with it"
            )
        super().launch(timeout=timeout)
        return self
