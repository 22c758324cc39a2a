"""Many QMP clients on one VM: `Machine.serve_qmp` against a real QEMU, with
vmpilot's clients, the `vmpilot events` CLI and QEMU's own qemu.qmp attached
together; the framing and the per-client rules without I/O."""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import QEMU, run_async

from vmpilot import AsyncMachine, Machine
from vmpilot.qmp import AsyncQMPClient, QMPClient
from vmpilot.qmp.mux import Garbage, Session, Splitter, TooLong, serve

ENV = {**os.environ, "VMPILOT_QEMU": QEMU}
TIMEOUT = 30.0


class Raw:
    """A hand-driven QMP client on a plain socket (reads bounded by a deadline)."""

    opened: ClassVar[list[Raw]] = []  # closed after each test

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        Raw.opened.append(self)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.buf = b""

    def line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the server closed the connection")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def send(self, data: bytes | dict[str, Any]) -> None:
        self.sock.sendall(data if isinstance(data, bytes) else json.dumps(data).encode())

    def negotiated(self) -> Raw:
        assert "QMP" in self.line()
        self.send({"execute": "qmp_capabilities"})
        assert self.line() == {"return": {}}
        return self

    def at_eof(self) -> bool:
        return self.sock.recv(65536) == b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(autouse=True)
def _close_raw_clients() -> Iterator[None]:
    yield
    for raw in Raw.opened:
        raw.close()
    Raw.opened.clear()


@pytest.fixture
def vm() -> Any:
    with Machine(machine="none", memory=32, accel="tcg", qemu=QEMU) as machine:
        yield machine


def test_three_kinds_of_clients_share_one_vm(vm: Machine, tmp_path: Path) -> None:
    legacy = pytest.importorskip("qemu.qmp.legacy")
    server = vm.serve_qmp(tmp_path / "qmp.sock")
    events = subprocess.Popen(
        [sys.executable, "-m", "vmpilot", "events", server.path, "--count", "2",
         "--name", "STOP", "--name", "RESUME"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        assert events.stderr is not None
        assert "waiting for events" in events.stderr.readline()  # connected and negotiated
        theirs = legacy.QEMUMonitorProtocol(server.path)
        theirs.connect(negotiate=True)
        ours = QMPClient.connect(server.path)
        try:
            assert server.clients == 3
            assert theirs.cmd("query-status")["running"] is True
            ours.execute("stop")
            assert theirs.cmd("query-status")["status"] == "paused"
            theirs.cmd("cont")
            assert ours.execute("query-status")["running"] is True
            assert ours.wait_event(timeout=TIMEOUT).name == "STOP"
            assert ours.wait_event(timeout=TIMEOUT).name == "RESUME"
            assert theirs.pull_event(wait=TIMEOUT)["event"] == "STOP"
            assert theirs.pull_event(wait=TIMEOUT)["event"] == "RESUME"
            assert vm.wait_event("STOP").name == "STOP"  # the Machine's own view too
            out, err = events.communicate(timeout=TIMEOUT)
            assert events.returncode == 0, err
            assert [json.loads(line)["event"] for line in out.splitlines()] == ["STOP", "RESUME"]
        finally:
            ours.close()
            theirs.close()
            theirs._aloop.close()  # the loop qemu.qmp's sync wrapper made for itself
            asyncio.set_event_loop(None)
    finally:
        if events.poll() is None:
            events.kill()
            events.communicate()
    assert vm.execute("query-status")["running"] is True


def test_same_id_from_two_clients_never_collides(vm: Machine, tmp_path: Path) -> None:
    server = vm.serve_qmp(tmp_path / "qmp.sock")
    a, b = Raw(server.path).negotiated(), Raw(server.path).negotiated()
    for _ in range(20):  # both in flight at once, the same id
        a.send({"execute": "query-status", "id": "same"})
        b.send({"execute": "query-name", "id": "same"})
        reply = a.line()  # query-status's own fields differ between QEMU versions
        assert reply["id"] == "same" and reply["return"]["status"] == "running"
        assert b.line() == {"return": {}, "id": "same"}
    a.send({"execute": "query-name"})  # no id: none in the reply, as from QEMU
    assert a.line() == {"return": {}}
    a.send({"execute": "query-name", "id": {"any": ["json", 1]}})
    assert a.line() == {"return": {}, "id": {"any": ["json", 1]}}
    assert vm.execute("query-name") == {}  # the Machine's own ids are unaffected


def test_every_negotiated_client_sees_every_event(vm: Machine, tmp_path: Path) -> None:
    server = vm.serve_qmp(tmp_path / "qmp.sock")
    clients = [Raw(server.path).negotiated() for _ in range(3)]
    shy = Raw(server.path)  # greeted, never negotiated: no events (as on QEMU)
    assert "QMP" in shy.line()
    vm.execute("stop")
    vm.execute("cont")
    for c in clients:
        assert [c.line()["event"], c.line()["event"]] == ["STOP", "RESUME"]
    shy.send({"execute": "query-status", "id": 1})
    assert shy.line()["error"]["class"] == "CommandNotFound"  # the next line is the answer


def test_garbage_and_disconnects_affect_only_their_client(vm: Machine, tmp_path: Path) -> None:
    server = vm.serve_qmp(tmp_path / "qmp.sock")
    good = Raw(server.path).negotiated()
    bad = Raw(server.path).negotiated()
    bad.send(b"nonsense\n")
    assert bad.line()["error"]["desc"].startswith("JSON parse error")
    bad.send(b'[1, 2]{"execute": 42}{"execute": "query-name", "id": 3, "x": 1}')
    assert "JSON object" in bad.line()["error"]["desc"]
    assert "'execute' must be a string" in bad.line()["error"]["desc"]
    assert bad.line() == {"error": {"class": "GenericError",
                                    "desc": "QMP input member 'x' is unexpected"}, "id": 3}  # fmt: skip
    bad.send(b'{"execute": "query-name", "arguments": {"x": NaN}, "id": 5}')
    assert bad.line()["error"]["desc"].startswith("JSON parse error")
    bad.send(b"[" * 100_000 + b"]" * 100_000)  # nesting no parser follows
    assert bad.line()["error"]["desc"].startswith("JSON parse error")
    bad.send(b'{"execute": "query-name", "id": 4}')  # still served after all that
    assert bad.line() == {"return": {}, "id": 4}
    half = Raw(server.path).negotiated()
    half.send(b'{"execute": "query-st')  # gone mid-message
    half.close()
    busy = Raw(server.path).negotiated()
    busy.send({"execute": "query-status", "id": 1})  # gone with its reply unread
    busy.close()
    good.send({"execute": "query-status", "id": 9})
    assert good.line()["id"] == 9
    assert vm.execute("query-status")["running"] is True
    wait_for(lambda: server.clients == 2, "the two dropped clients to be gone")


def test_a_client_that_stops_reading_is_dropped_alone(vm: Machine, tmp_path: Path) -> None:
    with serve(vm.qmp, tmp_path / "qmp.sock", max_backlog=4096) as server:
        good = Raw(server.path).negotiated()
        deaf = Raw(server.path).negotiated()
        for i in range(40):  # replies of ~100 KiB each, never read
            deaf.send({"execute": "query-qmp-schema", "id": i})
        wait_for(lambda: server.clients == 1, "the deaf client to be dropped")
        good.send({"execute": "query-name", "id": 1})
        assert good.line() == {"return": {}, "id": 1}
        assert vm.execute("query-status")["running"] is True


def test_quit_from_a_client_ends_the_vm_as_asked(tmp_path: Path) -> None:
    with Machine(machine="none", memory=32, accel="tcg", qemu=QEMU) as vm:
        server = vm.serve_qmp(tmp_path / "qmp.sock")
        c = Raw(server.path).negotiated()
        c.send({"execute": "quit", "id": "bye"})
        got = [c.line(), c.line()]  # the reply and the event (relayed on separate paths)
        assert {"return": {}, "id": "bye"} in got
        assert [m["event"] for m in got if "event" in m] == ["SHUTDOWN"]
        assert vm.wait(timeout=TIMEOUT) == 0  # QEMU ended by a request, status 0
        assert vm.state == "stopped" and not vm.crashed
        assert vm.qmp.closed_reason == "QEMU quit"  # on request, not "the peer closed it"
        assert c.at_eof()  # closed with the VM's cleanup
        assert not os.path.exists(server.path)
        vm.shutdown()  # leaving `with`: finds it stopped, raises nothing


def test_close_drops_clients_and_removes_only_its_socket(vm: Machine, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("not a socket")
    with pytest.raises(OSError):
        vm.serve_qmp(taken)
    assert taken.read_text() == "not a socket"  # never removed
    server = vm.serve_qmp(tmp_path / "qmp.sock")
    c = Raw(server.path).negotiated()
    server.close()
    server.close()  # idempotent
    assert c.at_eof()
    assert not os.path.exists(server.path)
    assert vm.execute("query-status")["running"] is True  # the VM's connection is untouched


def test_oob_passes_through_when_negotiated(tmp_path: Path) -> None:
    with Machine(machine="none", memory=32, accel="tcg", qemu=QEMU, expose_qmp=True) as vm:
        assert vm.qmp_path is not None
        upstream = QMPClient.connect(vm.qmp_path, oob=True)
        if "oob" not in upstream.greeting.capabilities:  # type: ignore[union-attr]
            upstream.close()
            pytest.skip("this QEMU offers no OOB on a unix socket monitor")
        with upstream, serve(upstream, tmp_path / "oob.sock") as server:
            c = Raw(server.path)
            assert c.line()["QMP"]["capabilities"] == ["oob"]
            c.send({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
            assert c.line() == {"return": {}}
            c.send({"exec-oob": "migrate-pause", "id": "o"})  # QEMU itself answers
            reply = c.line()
            assert reply["id"] == "o" and "postcopy" in reply["error"]["desc"]
            plain = Raw(server.path).negotiated()
            plain.send({"exec-oob": "migrate-pause", "id": "p"})
            assert "enable out-of-band" in plain.line()["error"]["desc"]
        # the Machine's own connection did not enable OOB: its server offers none
        with vm.serve_qmp(tmp_path / "m.sock") as mserver:
            assert Raw(mserver.path).line()["QMP"]["capabilities"] == []


def test_async_machine_serves_too(tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncMachine(machine="none", memory=32, accel="tcg", qemu=QEMU) as vm:
            server = vm.serve_qmp(tmp_path / "qmp.sock")
            async with AsyncQMPClient.connect(server.path) as a:
                await a.execute("stop")
                assert (await a.wait_event("STOP")).name == "STOP"
                assert (await vm.wait_event("STOP")).name == "STOP"
                assert (await a.execute("query-status"))["status"] == "paused"
            server.close()
            assert not os.path.exists(server.path)
            left = vm.serve_qmp(tmp_path / "left.sock")  # not closed by the test
            async with AsyncQMPClient.connect(left.path) as b:
                assert await b.execute("quit") == {}
            assert await vm.wait(timeout=TIMEOUT) == 0
            assert vm.qmp.closed_reason == "QEMU quit"
        assert not os.path.exists(left.path)  # closed with the VM's cleanup

    run_async(main())


def test_serving_needs_a_running_vm(tmp_path: Path) -> None:
    vm = Machine(machine="none", qemu=QEMU)
    with pytest.raises(Exception, match="no QMP connection"):
        vm.serve_qmp(tmp_path / "qmp.sock")


# -- no I/O -------------------------------------------------------------------


def test_splitter_any_split_gives_the_same_values() -> None:
    stream = b'{"execute":"a","arguments":{"s":"}{\\"]"}} [1]\n{"x":\n [ {}]}junk {"y":2}'
    whole = Splitter().feed(stream)
    assert [v for v in whole if not isinstance(v, Garbage)] == [
        {"execute": "a", "arguments": {"s": '}{"]'}}, [1], {"x": [{}]}, {"y": 2},
    ]  # fmt: skip
    assert [g.text for g in whole if isinstance(g, Garbage)] == [b"junk"]
    for cut in range(1, len(stream)):
        s = Splitter()
        parts = s.feed(stream[:cut]) + s.feed(stream[cut:])
        assert [v for v in parts if not isinstance(v, Garbage)] == [
            v for v in whole if not isinstance(v, Garbage)
        ]


def test_splitter_limits_a_message() -> None:
    s = Splitter(max_message=100)
    with pytest.raises(TooLong):
        s.feed(b'{"a":"' + b"x" * 200)


def test_session_rules_before_and_after_negotiation() -> None:
    s = Session(["oob"])
    early = s.handle({"execute": "query-status", "id": 1})
    assert early == {"error": {"class": "CommandNotFound", "desc":
                     "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1}  # fmt: skip
    assert (
        "not available"
        in s.handle(  # type: ignore[index]
            {"execute": "qmp_capabilities", "arguments": {"enable": ["nope"]}}
        )["error"]["desc"]
    )
    assert s.handle({"execute": "qmp_capabilities"}) == {"return": {}}
    assert s.handle({"execute": "qmp_capabilities"})["error"]["class"] == "CommandNotFound"  # type: ignore[index]
    relay = s.handle({"execute": "x", "arguments": {"a": 1}, "id": [1]})
    assert not isinstance(relay, dict)
    assert relay.message == {"execute": "x", "arguments": {"a": 1}}  # the client's id stays here
    assert relay.reply({"return": 5}) == {"return": 5, "id": [1]}


def wait_for(predicate: Any, what: str) -> None:
    """Wait (bounded) for the server's thread to notice a client left; it
    offers nothing to block on from outside, so this polls with select."""
    end = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        select.select([], [], [], 0.01)
