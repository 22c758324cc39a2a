"""What real QEMU cannot be made to do: a scripted peer that stalls, drips,
sends garbage, hangs up mid-message, or answers an id nobody asked."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from conftest import run_async

from vmpilot.errors import Disconnected, ProtocolError, Timeout
from vmpilot.qmp import AsyncQMPClient, QMPClient

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 9}}, "capabilities": []}}\r\n'
)

Script = Callable[["Peer"], None]


class Peer:
    """The server end of a socketpair, driven by a script in a thread."""

    def __init__(self, script: Script) -> None:
        self.client_sock, self.sock = socket.socketpair()
        self.sock.settimeout(10)
        self._buf = b""
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(script,))
        self.thread.start()

    def _run(self, script: Script) -> None:
        try:
            script(self)
        except BaseException as exc:  # reported by the fixture
            self.error = exc
        finally:
            self.sock.close()

    def read_command(self) -> dict:  # type: ignore[type-arg]
        while b"\n" not in self._buf:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    def greet_and_negotiate(self) -> None:
        self.sock.sendall(GREETING)
        cmd = self.read_command()
        assert cmd["execute"] == "qmp_capabilities"
        self.reply(cmd, {})

    def reply(self, cmd: dict, value: object) -> None:  # type: ignore[type-arg]
        self.sock.sendall(json.dumps({"return": value, "id": cmd["id"]}).encode() + b"\r\n")

    def wait_closed(self) -> None:
        """Block until the client hangs up (its EOF), so the script ends cleanly.
        A reset is a hang-up too (the client closed with our bytes unread);
        any other error (a timeout: the client never hung up) fails the test."""
        try:
            while self.sock.recv(4096):
                pass
        except ConnectionResetError:
            pass


@pytest.fixture
def peer() -> Iterator[Callable[[Script], Peer]]:
    peers: list[Peer] = []

    def make(script: Script) -> Peer:
        p = Peer(script)
        peers.append(p)
        return p

    yield make
    for p in peers:
        p.client_sock.close()
        p.thread.join(10)
        assert not p.thread.is_alive()
        # EOFError: the client hung up where the script expected a command
        if p.error is not None and not isinstance(p.error, (EOFError, ConnectionResetError)):
            raise p.error


def stall(p: Peer) -> None:
    p.greet_and_negotiate()
    p.read_command()  # and never answer
    p.wait_closed()


def eof_mid_message(p: Peer) -> None:
    p.greet_and_negotiate()
    cmd = p.read_command()
    p.sock.sendall(b'{"return": {"status": "runn')
    del cmd


def garbage(p: Peer) -> None:
    p.greet_and_negotiate()
    p.read_command()
    p.sock.sendall(b"\x00\x01 this is not json \xff\r\n")
    p.wait_closed()


def drip(p: Peer) -> None:
    p.sock.sendall(GREETING[:5])
    for b in GREETING[5:]:
        p.sock.sendall(bytes([b]))
    cmd = p.read_command()
    p.reply(cmd, {})
    cmd = p.read_command()
    data = json.dumps({"return": {"status": "running"}, "id": cmd["id"]}).encode() + b"\r\n"
    for b in data:
        p.sock.sendall(bytes([b]))
    p.wait_closed()


def unknown_id(p: Peer) -> None:
    p.greet_and_negotiate()
    cmd = p.read_command()
    p.sock.sendall(json.dumps({"return": {}, "id": cmd["id"] + 1000}).encode() + b"\r\n")
    p.wait_closed()


def no_greeting(p: Peer) -> None:
    p.wait_closed()


# -- blocking client ------------------------------------------------------


def test_sync_stall_times_out_then_unusable(peer: Callable[[Script], Peer]) -> None:
    p = peer(stall)
    qmp = QMPClient.connect(p.client_sock)
    with pytest.raises(Timeout, match=r"0.2 s waiting for the reply to 'query-status'"):
        qmp.execute("query-status", timeout=0.2)
    with pytest.raises(Disconnected, match="no answer within 0.2 s"):
        qmp.execute("query-status")
    qmp.close()


def test_sync_eof_mid_message(peer: Callable[[Script], Peer]) -> None:
    qmp = QMPClient.connect(peer(eof_mid_message).client_sock)
    with pytest.raises(Disconnected, match="peer closed it"):
        qmp.execute("query-status", timeout=10)
    qmp.close()


def test_sync_garbage(peer: Callable[[Script], Peer]) -> None:
    qmp = QMPClient.connect(peer(garbage).client_sock)
    with pytest.raises(ProtocolError, match="not valid UTF-8|not valid JSON") as info:
        qmp.execute("query-status", timeout=10)
    assert b"this is not json" in info.value.data
    with pytest.raises(Disconnected, match="protocol error"):
        qmp.execute("query-status")
    qmp.close()


def test_sync_slow_drip(peer: Callable[[Script], Peer]) -> None:
    with QMPClient.connect(peer(drip).client_sock) as qmp:
        assert qmp.execute("query-status", timeout=10) == {"status": "running"}


def test_sync_unknown_id(peer: Callable[[Script], Peer]) -> None:
    qmp = QMPClient.connect(peer(unknown_id).client_sock)
    with pytest.raises(ProtocolError, match="unknown id"):
        qmp.execute("query-status", timeout=10)
    qmp.close()


def test_sync_no_greeting_times_out(peer: Callable[[Script], Peer]) -> None:
    with pytest.raises(Timeout, match="QMP greeting"):
        QMPClient.connect(peer(no_greeting).client_sock, connect_timeout=0.2)


# -- asyncio client -------------------------------------------------------


def test_async_stall_times_out_then_unusable(peer: Callable[[Script], Peer]) -> None:
    async def main() -> None:
        qmp = await AsyncQMPClient.connect(peer(stall).client_sock)
        with pytest.raises(Timeout, match="reply to 'query-status'"):
            await qmp.execute("query-status", timeout=0.2)
        with pytest.raises(Disconnected, match="no answer within 0.2 s"):
            await qmp.execute("query-status")
        qmp.close()

    run_async(main())


def test_async_eof_mid_message(peer: Callable[[Script], Peer]) -> None:
    async def main() -> None:
        qmp = await AsyncQMPClient.connect(peer(eof_mid_message).client_sock)
        with pytest.raises(Disconnected, match="peer closed it"):
            await qmp.execute("query-status", timeout=10)

    run_async(main())


def test_async_garbage(peer: Callable[[Script], Peer]) -> None:
    async def main() -> None:
        qmp = await AsyncQMPClient.connect(peer(garbage).client_sock)
        with pytest.raises(ProtocolError, match="not valid UTF-8|not valid JSON") as info:
            await qmp.execute("query-status", timeout=10)
        assert b"this is not json" in info.value.data
        with pytest.raises(Disconnected, match="protocol error"):
            await qmp.execute("query-status")

    run_async(main())


def test_async_slow_drip(peer: Callable[[Script], Peer]) -> None:
    async def main() -> None:
        async with AsyncQMPClient.connect(peer(drip).client_sock) as qmp:
            assert await qmp.execute("query-status", timeout=10) == {"status": "running"}

    run_async(main())


def test_async_unknown_id(peer: Callable[[Script], Peer]) -> None:
    async def main() -> None:
        qmp = await AsyncQMPClient.connect(peer(unknown_id).client_sock)
        with pytest.raises(ProtocolError, match="unknown id"):
            await qmp.execute("query-status", timeout=10)

    run_async(main())


def test_async_no_greeting_times_out(peer: Callable[[Script], Peer]) -> None:
    async def main() -> None:
        with pytest.raises(Timeout, match="QMP greeting"):
            await AsyncQMPClient.connect(peer(no_greeting).client_sock, connect_timeout=0.2)

    run_async(main())


def _tcp_peer(family: int, host: str) -> tuple[socket.socket, int, threading.Thread]:
    """A one-shot QMP peer listening on an ephemeral loopback port."""
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        listener.close()
        conn.sendall(GREETING)
        buf = b""
        while True:
            data = conn.recv(4096)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                cmd = json.loads(line)
                conn.sendall(
                    json.dumps({"return": {"echo": cmd["execute"]}, "id": cmd["id"]}).encode()
                    + b"\n"
                )
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    return listener, port, t


@pytest.mark.parametrize(
    ("family", "host", "address"),
    [
        (socket.AF_INET, "127.0.0.1", "127.0.0.1:{port}"),
        (socket.AF_INET, "127.0.0.1", ("127.0.0.1", "{port}")),
        (socket.AF_INET6, "::1", "[::1]:{port}"),
    ],
)
def test_tcp_addresses(family: int, host: str, address: object) -> None:
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        _listener, port, t = _tcp_peer(family, host)
    except OSError as exc:
        pytest.skip(f"cannot listen on {host}: {exc}")
    addr = (
        address.format(port=port)
        if isinstance(address, str)
        else (address[0], int(address[1].format(port=port)))  # type: ignore[index]
    )
    with QMPClient.connect(addr) as qmp:  # type: ignore[arg-type]
        assert qmp.execute("query-status") == {"echo": "query-status"}

    async def main() -> None:
        _listener2, port2, t2 = _tcp_peer(family, host)
        try:
            async with AsyncQMPClient.connect(
                addr.replace(str(port), str(port2)) if isinstance(addr, str) else (addr[0], port2)
            ) as aqmp:
                assert await aqmp.execute("query-name") == {"echo": "query-name"}
        finally:
            t2.join(10)

    run_async(main())
    t.join(10)


def test_refused_tcp_port_is_a_clear_error() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(Disconnected, match=f"cannot connect to QMP at 127.0.0.1:{port}.*refused"):
        QMPClient.connect(f"127.0.0.1:{port}")
