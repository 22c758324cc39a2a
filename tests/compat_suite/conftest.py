"""Fixtures for a suite written against QEMU's in-tree `qemu.machine`."""

import os
import tempfile

import pytest

QEMU = os.environ.get("QEMU_BINARY", "qemu-system-x86_64")


def _has_qtest():
    # tried, not looked up: `-accel help` never lists qtest
    from vmpilot.qtest import qtest_available

    return qtest_available(QEMU)


HAS_QTEST = _has_qtest()


@pytest.fixture
def workdir():
    with tempfile.TemporaryDirectory() as d:
        yield d


@pytest.fixture(scope="session")
def tiny_bios(tmp_path_factory):
    # the tiny firmware guest (prints a banner, exits via isa-debug-exit on "~N")
    from vmpilot.guest import tiny

    return tiny.write(str(tmp_path_factory.mktemp("bios")))
