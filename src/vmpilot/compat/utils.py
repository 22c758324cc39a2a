"""`qemu.utils` as QEMU's test suites (iotests, avocado and functional tests,
7.2 to 10.x) use it, so the shim needs nothing of QEMU's `python/` tree:
`VerboseProcessError` (iotests.py imports it first thing), the accelerator
probes and the `info usernet` port parser. vmpilot's own implementation.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import textwrap

LOG = logging.getLogger("vmpilot.compat.utils")

# a host can also run its 32-bit (or other-endian) sibling's guests under KVM
_KVM_SIBLING = {"x86_64": "i386", "aarch64": "armhf", "ppc64le": "ppc64"}

# "  TCP[HOST_FORWARD]  12      127.0.0.1 38121       10.0.2.15    22 ..."
_HOSTFWD = re.compile(r"TCP.HOST_FORWARD.*?127\.0\.0\.1\s+(\d+)\s+10\.")


def list_accel(qemu_bin: str) -> list[str]:
    """The accelerators `qemu_bin -accel help` lists (qtest is never listed)."""
    if not qemu_bin:
        return []
    try:
        out = subprocess.run(
            [qemu_bin, "-accel", "help"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        LOG.debug("could not list the accelerators of %s", qemu_bin)
        raise
    lines = out.splitlines()[1:]  # the first line is a header
    return [line.strip() for line in lines if line.strip()]


def kvm_available(target_arch: str | None = None, qemu_bin: str | None = None) -> bool:
    """KVM can run a guest: /dev/kvm is usable, the target runs natively on this
    host (when `target_arch` is given), and `qemu_bin` (when given) has KVM."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    host = os.uname().machine
    if target_arch and target_arch not in (host, _KVM_SIBLING.get(host)):
        return False
    return not qemu_bin or "kvm" in list_accel(qemu_bin)


def tcg_available(qemu_bin: str) -> bool:
    """`qemu_bin` has the TCG accelerator."""
    return "tcg" in list_accel(qemu_bin)


def get_info_usernet_hostfwd_port(info_usernet_output: str) -> int | None:
    """The host port of the first `hostfwd` to 127.0.0.1 in HMP `info usernet`
    output (lines end in CRLF there), or None."""
    for line in info_usernet_output.splitlines():
        found = _HOSTFWD.search(line)
        if found:
            return int(found.group(1))
    return None


def add_visual_margin(
    content: str = "",
    width: int | None = None,
    name: str | None = None,
    padding: int = 1,
    upper_left: str = "┏",
    lower_left: str = "┗",
    horizontal: str = "━",
    vertical: str = "┃",
) -> str:
    """`content` wrapped to `width` columns inside a left-hand margin with a
    top bar (labelled `name`) and a bottom bar. `width` None is the terminal's
    width (COLUMNS, else 72); a negative width is that much less."""
    total = width if width is not None and width >= 0 else None
    if total is None:
        total = shutil.get_terminal_size(fallback=(72, 24)).columns + (width or 0)
    prefix = vertical + " " * padding

    def bar(corner: str, label: str | None) -> str:
        head = corner + (f"{horizontal} {label} " if label is not None else "")
        return head + horizontal * max(0, total - len(head))

    body = []
    for line in content.splitlines():
        wrapped = textwrap.wrap(
            line, width=total - padding, initial_indent=prefix, subsequent_indent=prefix,
            replace_whitespace=False, break_on_hyphens=False,
        )  # fmt: skip
        body.append(os.linesep.join(wrapped))
    return os.linesep.join([bar(upper_left, name), os.linesep.join(body), bar(lower_left, None)])


class VerboseProcessError(subprocess.CalledProcessError):
    """A `CalledProcessError` whose text also shows the process's output (and
    stderr, when captured apart), so a failed helper run explains itself in a
    test log."""

    def summary(self) -> str:
        """The plain `CalledProcessError` text."""
        return super().__str__()

    def __str__(self) -> str:
        margin = "  "
        combined = self.stderr is None  # stdout holds both streams
        label = "output" if combined else "stdout"
        parts = [self.summary()]
        for title, text in ((label, self.stdout), ("stderr", self.stderr)):
            if title == "stderr" and combined:
                continue
            if text:
                if isinstance(text, bytes):
                    text = text.decode(errors="replace")
                boxed = add_visual_margin(text, -len(margin), title)
                parts.append(textwrap.indent(boxed, margin))
            else:
                parts.append(f"{margin}{title}: N/A")
        return os.linesep.join(parts)


__all__ = [
    "VerboseProcessError",
    "add_visual_margin",
    "get_info_usernet_hostfwd_port",
    "kvm_available",
    "list_accel",
    "tcg_available",
]
