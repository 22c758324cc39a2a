"""`QEMUQtestMachine` / `QEMUQtestProtocol` with the API of QEMU's
`qemu.machine.qtest`, on vmpilot's qtest client (qtest on a socketpair)."""

from __future__ import annotations

import socket
from collections.abc import Sequence

from ..machine.config import options
from ..qtest import Qtest
from .legacy import SocketAddrT
from .machine import QEMUMachine, QEMUMachineError


class QEMUQtestProtocol:
    """A qtest connection: `cmd(line)` returns QEMU's answer line."""

    def __init__(
        self,
        address: SocketAddrT | None = None,
        sock: socket.socket | None = None,
        server: bool = False,
    ) -> None:
        if sock is None and address is None:
            raise ValueError("QEMUQtestProtocol needs an address or a socket")
        self._address = address
        self._listener: socket.socket | None = None
        self._client: Qtest | None = Qtest(sock) if sock is not None else None
        self._timeout: float | None = None
        if server and sock is None:
            family = socket.AF_INET if isinstance(address, tuple) else socket.AF_UNIX
            self._listener = socket.socket(family, socket.SOCK_STREAM)
            self._listener.bind(address)  # type: ignore[arg-type]
            self._listener.listen(1)

    def connect(self) -> None:
        if self._client is None:
            family = socket.AF_INET if isinstance(self._address, tuple) else socket.AF_UNIX
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.connect(self._address)  # type: ignore[arg-type]
            self._client = Qtest(sock)

    def accept(self) -> None:
        if self._listener is None:
            raise QEMUMachineError("accept() needs QEMUQtestProtocol(..., server=True)")
        conn, _ = self._listener.accept()
        self._listener.close()
        self._listener = None
        self._client = Qtest(conn)

    def cmd(self, qtest_cmd: str) -> str:
        if self._client is None:
            raise QEMUMachineError("qtest is not connected")
        # the answer line with its newline, as QEMU's library returns it (IRQ lines are kept out)
        return self._client.request(qtest_cmd, timeout=self._timeout) + "\n"

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None


class QEMUQtestMachine(QEMUMachine):
    """A `QEMUMachine` under `-accel qtest` with a qtest channel."""

    def __init__(
        self,
        binary: str,
        args: Sequence[str] = (),
        wrapper: Sequence[str] = (),
        name: str | None = None,
        base_temp_dir: str = "/var/tmp",
        sock_dir: str | None = None,
        qmp_timer: float | None = None,
    ) -> None:
        super().__init__(
            binary, args, wrapper=wrapper, name=name, base_temp_dir=base_temp_dir,
            sock_dir=sock_dir, qmp_timer=qmp_timer,
        )  # fmt: skip
        self._qtest: QEMUQtestProtocol | None = None
        self._qtest_pair: tuple[socket.socket, socket.socket] | None = None

    @property
    def _base_args(self) -> list[str]:
        args = super()._base_args
        if self._qtest_pair is not None:
            fd = self._qtest_pair[1].fileno()
            args += ["-chardev", options("socket", id="qtest", fd=fd), "-qtest", "chardev:qtest"]
        return [*args, "-accel", "qtest"]

    def _pre_launch(self) -> None:
        self._qtest_pair = socket.socketpair()
        self._launch_fds.append(self._qtest_pair[1].fileno())
        super()._pre_launch()

    def _post_launch(self) -> None:
        assert self._qtest_pair is not None
        self._qtest_pair[1].close()
        self._qtest = QEMUQtestProtocol(sock=self._qtest_pair[0])
        super()._post_launch()

    def _post_shutdown(self) -> None:
        if self._qtest is not None:
            self._qtest.close()
            self._qtest = None
        if self._qtest_pair is not None:
            for s in self._qtest_pair:
                s.close()
            self._qtest_pair = None
        super()._post_shutdown()

    def qtest(self, cmd: str) -> str:
        """Send a qtest command line; QEMU's answer line."""
        if self._qtest is None:
            raise QEMUMachineError("qtest is not connected (launch() first)")
        return self._qtest.cmd(cmd)
