"""`vmpilot qmp -c` against a real QEMU: JSON values, validation before
sending, transactions, HMP errors, and qmp-shell's own documented examples."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import QEMU, QEMU_NONE, RawQemu

from vmpilot.cli.qmp_shell import hmp_error
from vmpilot.qmp import QMPClient

VMPILOT = [sys.executable, "-m", "vmpilot"]
ENV = {**os.environ, "VMPILOT_QEMU": QEMU}


def qmp(
    path: str, *lines: str, hmp: bool = False, log: Path | None = None, flags: tuple[str, ...] = ()
) -> tuple[int, str]:
    argv = [*VMPILOT, "qmp", path, *(["--hmp"] if hmp else []), *flags]
    argv += ["--log", str(log)] if log else []
    for line in lines:
        argv += ["-c", line]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=ENV)
    assert not r.stderr, r.stderr
    return r.returncode, r.stdout


def test_a_json_object_value_reaches_qemu_as_an_object(qemu_unix: tuple[RawQemu, str]) -> None:
    q, path = qemu_unix
    # the line: shlex used to strip the quotes and send a string
    rc, out = qmp(path, 'blockdev-add node-name=n0 driver=raw file={"driver":"null-co"}')
    assert (rc, json.loads(out)) == (0, {})
    nodes = q.qmp.execute("query-named-block-nodes", {"flat": True})
    assert {n["node-name"]: n["drv"] for n in nodes}["n0"] == "raw"
    # nested keys and Python-style literals build the same object
    rc, _ = qmp(path, "blockdev-add node-name=n1 driver=raw file.driver=null-co file.size=4096")
    assert rc == 0
    rc, _ = qmp(path, "blockdev-add node-name=n2 driver=raw file={'driver':'null-co','size':512}")
    assert rc == 0
    sizes = {n["node-name"]: n["image"]["virtual-size"]
             for n in q.qmp.execute("query-named-block-nodes", {"flat": True})}  # fmt: skip
    assert (sizes["n1"], sizes["n2"]) == (4096, 512)


def test_validation_refuses_before_sending(qemu_unix: tuple[RawQemu, str], tmp_path: Path) -> None:
    _, path = qemu_unix
    log = tmp_path / "t.jsonl"
    rc, out = qmp(path, "device_del idd=x", log=log)
    assert rc == 1
    assert out == ("error: device_del has no argument 'idd'; did you mean 'id'? (it takes: id)"
                   " (not sent)\n")  # fmt: skip
    assert not log.exists() or log.read_text() == ""  # nothing went to QEMU
    rc, out = qmp(path, "query-statu")
    assert rc == 1 and "no command 'query-statu'; did you mean 'query-status'" in out
    rc, out = qmp(path, "blockdev-add node-name=x driver=nul-co")
    assert rc == 1 and "blockdev-add.driver cannot be 'nul-co'; did you mean 'null-co'" in out
    rc, out = qmp(path, "qom-get path=/machine")
    assert rc == 1 and "needs argument 'property'" in out
    rc, out = qmp(path, '{"execute": "device_del", "arguments": {"idd": "x"}}')
    assert rc == 1 and "did you mean 'id'" in out  # raw JSON is checked too
    rc, out = qmp(path, "query-status", "device_del idd=x", "query-name")
    assert rc == 1 and out.count("{") == 2  # the others still ran


def test_bare_digits_go_as_a_string_where_the_schema_wants_one(
    qemu_unix: tuple[RawQemu, str],
) -> None:
    q, path = qemu_unix
    rc, out = qmp(path, "blockdev-add node-name=n7 driver=null-co size=1024",
                  "qom-set path=/machine property=type value=1")  # fmt: skip
    # size is an int: sent as 1024; qom-set's value is "any": 1 stays a number
    assert rc == 1 and "GenericError" in out  # (the type property is read-only)
    assert "must be" not in out  # both passed validation
    sizes = {n["node-name"]: n["image"]["virtual-size"]
             for n in q.qmp.execute("query-named-block-nodes", {"flat": True})}  # fmt: skip
    assert sizes["n7"] == 1024
    rc, out = qmp(path, "device_del id=123", flags=("-v",))  # id is a str: "123", not 123
    assert rc == 1 and "Device '123' not found" in out
    assert out.startswith('{"execute": "device_del", "arguments": {"id": "123"}}\n')  # -v echoes


def test_transaction_one_line_and_over_several_c(qemu_unix: tuple[RawQemu, str]) -> None:
    q, path = qemu_unix
    q.qmp.execute("blockdev-add", {"node-name": "drive0", "driver": "null-co"})
    rc, out = qmp(path, "transaction( block-dirty-bitmap-add node=drive0 name=b0 ; "
                        "block-dirty-bitmap-add node=drive0 name=b1 persistent=false )")  # fmt: skip
    assert (rc, json.loads(out)) == (0, {})
    rc, out = qmp(path, "transaction(", "block-dirty-bitmap-clear node=drive0 name=b0",
                  "query-status", "block-dirty-bitmap-remove node=drive0 name=b1", ")")  # fmt: skip
    assert rc == 1 and out.startswith("error: transaction.actions[1].type cannot be 'query-status'")
    assert json.loads(out.split("\n", 1)[1]) == {}  # that line was dropped; the rest was sent
    [node] = [n for n in q.qmp.execute("query-named-block-nodes") if n["node-name"] == "drive0"]
    assert [b["name"] for b in node["dirty-bitmaps"]] == ["b0"]
    rc, out = qmp(path, "transaction( block-dirty-bitmap-ad node=drive0 name=b2 )")
    assert rc == 1 and "did you mean 'block-dirty-bitmap-add'" in out
    # a bad action on the closing line is refused and the transaction stays open
    rc, out = qmp(path, "transaction(", "block-dirty-bitmap-add node=drive0 name=b3",
                  "block-dirty-bitmap-ad node=drive0 name=b4 )", ")")  # fmt: skip
    assert rc == 1 and out.count("error:") == 1 and out.endswith("{}\n")
    [node] = [n for n in q.qmp.execute("query-named-block-nodes") if n["node-name"] == "drive0"]
    assert sorted(b["name"] for b in node["dirty-bitmaps"]) == ["b0", "b3"]
    rc, out = qmp(path, "transaction(", "abort")
    assert rc == 1 and "was not closed with ')': nothing sent" in out


def test_qmp_shell_documented_examples(tmp_path: Path) -> None:
    """The examples of QEMU's python/qemu/qmp/qmp_shell.py, typed as written."""
    path = str(tmp_path / "qmp.sock")
    q = RawQemu(["-machine", "pc", "-S", "-qmp", f"unix:{path},server=on,wait=off"], first=True)
    try:
        q.qmp = QMPClient.connect(q.take_socket())
        q.qmp.execute("blockdev-add", {"node-name": "drive0", "driver": "null-co"})
        q.qmp.execute("block-dirty-bitmap-add", {"node": "drive0", "name": "bitmap0"})
        rc, out = qmp(path, "device_add driver=e1000 id=net1")
        assert (rc, out) == (0, "{}\n")
        rc, out = qmp(path, "transaction(", "block-dirty-bitmap-add node=drive0 name=bitmap1",
                      "block-dirty-bitmap-clear node=drive0 name=bitmap0", ")")  # fmt: skip
        assert (rc, out) == (0, "{}\n")
        rc, out = qmp(path, "transaction( block-dirty-bitmap-disable node=drive0 name=bitmap1 )")
        assert (rc, out) == (0, "{}\n")
        rc, out = qmp(path, "qom-get path=/machine/peripheral/net1 property=netdev")
        assert rc == 0 and json.loads(out) == ""
        # "arg-name1={'key':'value','obj'={'prop':\"value\"}}": Python and JSON mixed
        rc, out = qmp(path, "object-add qom-type=secret id=s1 data={'k'=\"v\"}")
        assert rc == 1 and "object-add.data must be a JSON string" in out
        rc, out = qmp(path, "object-add qom-type=secret id=s1 data='v' format=raw")
        assert (rc, out) == (0, "{}\n")
    finally:
        if q.qmp is not None:
            q.qmp.close()
        q.stop()


def _more_qemus() -> list[str]:
    """QEMU binaries to check HMP's error forms on, besides the default
    (`VMPILOT_TEST_MORE_QEMUS=/a/qemu-system-x86_64:/b/...`)."""
    more = os.environ.get("VMPILOT_TEST_MORE_QEMUS", "")
    return [QEMU, *[p for p in more.split(":") if p]]


@pytest.fixture(params=_more_qemus())
def any_qemu_unix(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """QEMU (`request.param`) on a unix socket path; its greeting on a
    socketpair monitor set up after it proves the path exists."""
    path = str(tmp_path / "qmp.sock")
    ours, theirs = socket.socketpair()
    argv = [request.param, *QEMU_NONE[1:], "-qmp", f"unix:{path},server=on,wait=off",
            "-chardev", f"socket,id=m,fd={theirs.fileno()}", "-mon", "chardev=m,mode=control"]  # fmt: skip
    proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
    theirs.close()
    try:
        with QMPClient.connect(ours):
            yield path
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize(
    ("line", "failed"),
    [
        ("info nonsense", True), ("nonsense", True), ("device_del nope", True),
        ("chardev-add foo", True), ("info qtree 1", True), ("sum 0 zz", True),
        ("info status", False), ("stop", False), ("help x", False), ("info version", False),
    ],
)  # fmt: skip
def test_hmp_exit_status_follows_hmp_errors(any_qemu_unix: str, line: str, failed: bool) -> None:
    rc, out = qmp(any_qemu_unix, line, hmp=True)
    assert rc == int(failed), out


def test_hmp_error_forms() -> None:
    assert hmp_error("unknown command: 'info nonsense'\r\n") == "unknown command: 'info nonsense'"
    assert hmp_error("Error: Device 'x' not found\r\n") == "Error: Device 'x' not found"
    text = "invalid char 'z' in expression\r\nTry \"help sum\" for more information\r\n"
    assert hmp_error(text) == "invalid char 'z' in expression"
    assert hmp_error("VM status: running\r\n") is None
    assert hmp_error("x /fmt addr -- virtual memory dump starting at 'addr'\r\n") is None
