"""The qemu.machine / qemu.qmp.legacy shim: a suite written for QEMU's
in-tree library (tests/compat_suite) runs unchanged with the shim first on
PYTHONPATH."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import QEMU

from vmpilot.compat import shim_path

SUITE = Path(__file__).parent / "compat_suite"


def _poisoned_qemu_tree(root: Path) -> Path:
    """A stand-in for QEMU's python/ tree, behind the shim on PYTHONPATH:
    any module of it that gets imported fails, so the suite proves the shim
    needs nothing of QEMU's (qemu.utils was missing once and fell through)."""
    for package in ("machine", "qmp", "utils"):
        (root / "qemu" / package).mkdir(parents=True)
        (root / "qemu" / package / "__init__.py").write_text(
            f"raise ImportError('QEMU\\'s own qemu.{package} was imported')\n"
        )
    return root


def test_in_tree_style_suite_passes_with_the_shim_alone(tmp_path: Path) -> None:
    poisoned = _poisoned_qemu_tree(tmp_path / "qemu-python")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([shim_path(), str(poisoned)]),
        "QEMU_BINARY": QEMU,
        "VMPILOT_SHIM": shim_path(),
    }
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:vmpilot", "-p", "no:asyncio",
         "-c", str(SUITE / "pytest.ini"), str(SUITE)],
        capture_output=True, text=True, timeout=300, env=env, cwd=SUITE,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


def test_the_shim_is_what_gets_imported_only_when_asked() -> None:
    code = "import qemu.machine, qemu.qmp.legacy as l; print(qemu.machine.__file__, l.__file__)"
    env = {**os.environ, "PYTHONPATH": shim_path()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.count(shim_path()) == 2
    without = subprocess.run(
        [sys.executable, "-c", "import qemu.machine"], capture_output=True, text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    assert without.returncode != 0  # vmpilot alone does not provide qemu.machine


def test_compat_path_command() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "vmpilot", "compat", "path"], capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.strip() == shim_path()
    assert Path(shim_path(), "qemu", "machine", "__init__.py").exists()
