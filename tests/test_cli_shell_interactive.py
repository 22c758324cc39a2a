"""The QMP shell at a terminal: transaction mode, validation, JSON values,
HMP completion. Keys are typed only once the prompt is on screen."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from conftest import RawQemu
from test_cli_interactive import Terminals, on_screen


@pytest.fixture
def spawn() -> Iterator[Terminals]:
    terms = Terminals()
    yield terms
    for child in terms.children:
        child.close(force=True)


def test_transaction_mode_validation_and_json_at_the_prompt(
    qemu_unix: tuple[RawQemu, str], tmp_path: Path, spawn: Terminals
) -> None:
    q, path = qemu_unix
    q.qmp.execute("blockdev-add", {"node-name": "drive0", "driver": "null-co"})
    log = tmp_path / "t.jsonl"
    shell = spawn("qmp", path, "--log", str(log), XDG_STATE_HOME=str(tmp_path))
    prompt, trans = on_screen("(QEMU)"), on_screen("TRANS>")
    shell.expect(prompt)
    shell.send("device_del idd=x\r")  # refused here, with the right name
    shell.expect("has no argument 'idd'; did you mean 'id'\\?")
    shell.expect(prompt)
    shell.send('blockdev-add node-name=n0 driver=raw file={"driver": "null-co"}\r')
    shell.expect(r"\{\}")
    shell.expect(prompt)
    shell.send("transaction(\r")
    shell.expect(trans)
    shell.send("block-dirty-bitmap-ad\t")  # action names complete from the schema
    shell.expect(on_screen("block-dirty-bitmap-add"))
    shell.send(" no\t")  # and the action's arguments
    shell.expect(on_screen("node="))
    shell.send("drive0 name=b9\r")
    shell.expect(trans)
    shell.send("query-status\r")  # not an action: refused, the transaction stays open
    shell.expect("cannot be 'query-status'")
    shell.expect(trans)
    shell.send("block-dirty-bitmap-add node=drive0 name=b8 )\r")
    shell.expect(r"\{\}")
    shell.expect(prompt)
    shell.sendeof()
    shell.expect(pexpect.EOF)
    shell.close()
    assert shell.exitstatus == 0
    [node] = [n for n in q.qmp.execute("query-named-block-nodes") if n["node-name"] == "drive0"]
    assert sorted(b["name"] for b in node["dirty-bitmaps"]) == ["b8", "b9"]
    sent = [json.loads(x)["command"] for x in log.read_text().splitlines() if "command" in x]
    assert [c["execute"] for c in sent] == ["blockdev-add", "transaction"]  # nothing else went
    assert sent[0]["arguments"]["file"] == {"driver": "null-co"}


def test_plain_prompt_transaction(
    qemu_unix: tuple[RawQemu, str], tmp_path: Path, spawn: Terminals
) -> None:
    q, path = qemu_unix
    q.qmp.execute("blockdev-add", {"node-name": "drive0", "driver": "null-co"})
    shell = spawn("qmp", path, VMPILOT_PLAIN_PROMPT="1", XDG_STATE_HOME=str(tmp_path))
    shell.expect_exact("(QEMU) ")
    shell.send("transaction(\r")
    shell.expect_exact("TRANS> ")
    shell.send("block-dirty-bitmap-add node=drive0 name=p1\r")
    shell.expect_exact("TRANS> ")
    shell.send(")\r")
    shell.expect(r"\{\}")
    shell.expect_exact("(QEMU) ")
    shell.send("transaction(\r")
    shell.expect_exact("TRANS> ")
    shell.sendeof()  # left open: said so, nothing sent
    shell.expect("was not closed with '\\)': nothing sent")
    shell.expect(pexpect.EOF)
    [node] = [n for n in q.qmp.execute("query-named-block-nodes") if n["node-name"] == "drive0"]
    assert [b["name"] for b in node["dirty-bitmaps"]] == ["p1"]


def test_hmp_commands_complete_from_hmp_help(
    qemu_unix: tuple[RawQemu, str], tmp_path: Path, spawn: Terminals
) -> None:
    _, path = qemu_unix
    shell = spawn("qmp", path, "--hmp", XDG_STATE_HOME=str(tmp_path))
    prompt = on_screen("(HMP)")
    shell.expect(prompt)
    shell.send("info versio\t")
    shell.expect(on_screen("info version"))
    shell.send("\r")
    shell.expect(r"\d+\.\d+\.\d+")
    shell.expect(prompt)
    shell.send("info nonsense\r")
    shell.expect("unknown command: 'info nonsense'")
    shell.expect(prompt)
    shell.sendeof()
    shell.expect(pexpect.EOF)
