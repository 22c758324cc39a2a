"""The pure parts of the Machine layer: `build_argv` (any string value stays
exactly one parameter), the Lifecycle's transition table, and the parity of
Machine and AsyncMachine."""

from __future__ import annotations

import inspect

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmpilot import AsyncMachine, Drive, Machine, MachineConfig
from vmpilot.machine.argv import Wiring, build_argv
from vmpilot.machine.lifecycle import TRANSITIONS, IllegalTransition, Lifecycle, State


def parse(option: str) -> list[tuple[str, str]]:
    """QEMU's QemuOpts reading of `key=value,...` (`,,` is a literal comma)."""
    params: list[str] = []
    cur = ""
    i = 0
    while i < len(option):
        if option[i] == ",":
            if option[i + 1 : i + 2] == ",":
                cur += ","
                i += 2
                continue
            params.append(cur)
            cur = ""
        else:
            cur += option[i]
        i += 1
    params.append(cur)
    out = []
    for param in params:
        key, sep, value = param.partition("=")
        out.append((key, value) if sep else (key, ""))
    return out


def after(argv: list[str], flag: str, nth: int = 0) -> str:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag][nth]


text = st.text(st.characters(blacklist_characters="\n\0"), min_size=1)


@given(text)
def test_name_is_one_parameter(name: str) -> None:
    argv = build_argv(MachineConfig(machine="none", name=name), "tcg")
    assert parse(after(argv, "-name")) == [("guest", name)]


@given(text)
def test_drive_file_is_one_parameter_of_the_file_driver(path: str) -> None:
    argv = build_argv(MachineConfig(machine="none", drives=[Drive(path, id="d")]), "tcg")
    params = parse(after(argv, "-drive"))
    assert params[:2] == [("file.driver", "file"), ("file.filename", path)]
    assert [k for k, _ in params] == ["file.driver", "file.filename", "format", "if", "id"]


@given(text)
def test_exposed_qmp_path_is_one_parameter(path: str) -> None:
    argv = build_argv(MachineConfig(machine="none"), "tcg", Wiring(qmp_fd=5, qmp_path=path))
    assert parse(after(argv, "-chardev", 1)) == [
        ("socket", ""), ("id", "vmpilot-qmp-unix"), ("path", path),
        ("server", "on"), ("wait", "off"),
    ]  # fmt: skip


@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True), text, max_size=4))
def test_device_mapping_values_are_one_parameter_each(props: dict[str, str]) -> None:
    spec = {"driver": "virtio-rng-pci", **props}
    argv = build_argv(MachineConfig(machine="none", devices=[spec]), "tcg")
    assert parse(after(argv, "-device")) == [("virtio-rng-pci", ""), *props.items()]


def test_every_channel_comes_from_the_wiring() -> None:
    wiring = Wiring(qmp_fd=3, serial_fd=4, qtest_fd=5, agent_fd=6, preset_fds=[(7, 1, "o,p")])
    argv = build_argv(MachineConfig(machine="none"), "tcg", wiring, qemu="/q")
    assert argv[0] == "/q" and sorted(wiring.fds) == [3, 4, 5, 6, 7]
    assert after(argv, "-add-fd") == "fd=7,set=1,opaque=o,,p"
    assert after(argv, "-qtest") == "chardev:qtest" and after(argv, "-serial").startswith(
        "chardev:"
    )
    assert "-qmp" not in argv  # a path in `-qmp unix:` cannot be escaped


@pytest.mark.parametrize("bad", ["a\nb", "a\0b"])
def test_newline_or_nul_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="newline or NUL"):
        build_argv(MachineConfig(machine="none", name=bad), "tcg")


def test_lifecycle_moves_only_along_the_table() -> None:
    for frm, allowed in TRANSITIONS.items():
        for to in State:
            life = Lifecycle(MachineConfig())
            life._state = frm  # set up the start state directly (the table is the test's subject)
            if to in allowed:
                life.move(to)
                assert life.state is to
            else:
                with pytest.raises(IllegalTransition):
                    life.move(to)
                assert life.state is frm
    life = Lifecycle(MachineConfig())
    assert not life.claim(State.RUNNING, State.SHUTTING_DOWN) and life.state is State.NEW


def _public(cls: type) -> dict[str, object]:
    return {n: getattr(cls, n) for n in dir(cls) if not n.startswith("_")}


def test_machine_and_async_machine_have_the_same_operations() -> None:
    sync, aio = _public(Machine), _public(AsyncMachine)
    assert sync.keys() == aio.keys()
    for name, attr in sync.items():
        if callable(attr):
            ps = inspect.signature(attr).parameters  # type: ignore[arg-type]
            pa = inspect.signature(aio[name]).parameters  # type: ignore[arg-type]
            assert [(p.name, p.kind, p.default) for p in ps.values()] == [
                (p.name, p.kind, p.default) for p in pa.values()
            ], name
            for p in ps.values():
                assert p.default is not Ellipsis, name
                if p.name == "timeout":
                    assert p.kind is inspect.Parameter.KEYWORD_ONLY, name


def test_qtest_channel_does_not_import_the_machine() -> None:
    import ast

    import vmpilot.qtest

    tree = ast.parse(inspect.getsource(vmpilot.qtest))
    top = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
    assert all("machine" not in (n.module or "") for n in top)
    assert vmpilot.qtest.QtestMachine.__module__ == "vmpilot.machine.qtest_machine"
