"""`vmpilot qga SOCKET` against qemu-ga in the bundled guest, on a socket path
as a user would start QEMU by hand."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from conftest import QEMU
from test_cli_interactive import Terminals, on_screen

from vmpilot import Machine, guest

VMPILOT = [sys.executable, "-m", "vmpilot"]
ENV = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm", "VMPILOT_QEMU": QEMU}


@pytest.fixture(scope="module")
def agent_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The bundled guest (with qemu-ga) whose agent port is a unix socket path."""
    path = str(tmp_path_factory.mktemp("qga") / "qga.sock")
    wiring = ["-chardev", f"socket,path={path},server=on,wait=off,id=qga0",
              "-device", "virtio-serial-pci",
              "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]  # fmt: skip
    config = guest.default(agent=True).config(qemu=QEMU, agent=False, extra_args=wiring)
    with Machine(config) as vm:
        assert vm.pid is not None
        yield path


def qga(path: str, *lines: str) -> tuple[int, str]:
    argv = [*VMPILOT, "qga", path, "--timeout", "300"]
    for line in lines:
        argv += ["-c", line]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=400, env=ENV)
    assert not r.stderr, r.stderr
    return r.returncode, r.stdout


def test_one_shot_commands_json_output_and_exit_status(agent_socket: str) -> None:
    rc, out = qga(agent_socket, "guest-ping", "guest-get-osinfo")
    assert rc == 0
    ping, osinfo = out.split("\n{", 1)
    assert json.loads(ping) == {} and json.loads("{" + osinfo)["machine"] == "x86_64"
    rc, out = qga(agent_socket, "guest-pin")  # checked against guest-info's list: not sent
    assert rc == 1 and "no command 'guest-pin'; did you mean 'guest-ping'" in out
    rc, out = qga(agent_socket, "guest-file-open path=/no/such/file")
    assert rc == 1 and out.startswith("error: GenericError: failed to open file '/no/such/file'")


def test_file_round_trip_with_json_arguments(agent_socket: str) -> None:
    rc, out = qga(agent_socket, 'guest-file-open path="/tmp/cli file" mode=w')
    assert rc == 0
    handle = json.loads(out)
    data = base64.b64encode(b"written by vmpilot qga\n").decode()
    rc, out = qga(agent_socket, f"guest-file-write handle={handle} buf-b64={data}",
                  f'{{"execute": "guest-file-close", "arguments": {{"handle": {handle}}}}}')  # fmt: skip
    assert rc == 0 and json.loads(out.split("\n}\n")[0] + "}")["count"] == 23
    rc, out = qga(agent_socket, "guest-file-open path='/tmp/cli file'")
    handle = json.loads(out)
    rc, out = qga(
        agent_socket, f"guest-file-read handle={handle}", f"guest-file-close handle={handle}"
    )
    assert rc == 0
    read = json.loads(out.rsplit("{}", 1)[0])
    assert base64.b64decode(read["buf-b64"]) == b"written by vmpilot qga\n"


@pytest.fixture
def spawn() -> Iterator[Terminals]:
    terms = Terminals()
    yield terms
    for child in terms.children:
        child.close(force=True)


def test_interactive_completes_from_guest_info(
    agent_socket: str, spawn: Terminals, tmp_path: Path
) -> None:
    shell = spawn("qga", agent_socket, "--timeout", "300", XDG_STATE_HOME=str(tmp_path))
    prompt = on_screen("(QGA)")
    shell.expect("Connected to the guest agent")
    shell.expect(prompt)
    shell.send("guest-pi\t")
    shell.expect(on_screen("guest-ping"))
    shell.send("\r")
    shell.expect(r"\{\}")
    shell.expect(prompt)
    shell.send("guest-get-tim\t")
    shell.expect(on_screen("guest-get-time"))
    shell.send("\r")
    shell.expect(r"\d{15,}")  # nanoseconds since the epoch
    shell.expect(prompt)
    shell.sendeof()
    shell.expect(pexpect.EOF)
    shell.close()
    assert shell.exitstatus == 0
    assert "guest-get-time" in (tmp_path / "vmpilot" / "qga-history").read_text()
