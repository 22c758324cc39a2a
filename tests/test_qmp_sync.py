"""QMPClient (blocking) against real QEMU -machine none."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from conftest import RawQemu, wait_until
from kernel_wait import blocked_reading

from vmpilot.errors import CommandError, Disconnected, QMPError, Timeout
from vmpilot.qmp import Event, QMPClient


def test_socketpair_greeting_and_negotiation(raw_qemu: RawQemu) -> None:
    with QMPClient.connect(raw_qemu.take_socket()) as qmp:
        assert qmp.greeting is not None
        assert qmp.greeting.qemu_version >= (7, 0, 0)
        assert qmp.execute("query-status")["status"] in ("running", "prelaunch")


def test_unix_path_and_fd_adoption(qemu_unix: tuple[RawQemu, str]) -> None:
    _, path = qemu_unix
    with QMPClient.connect(path) as qmp:
        assert "status" in qmp.execute("query-status")
    with pytest.raises(Disconnected, match="cannot connect"):
        QMPClient.connect(path + ".missing")


def test_adopts_a_raw_fd(raw_qemu: RawQemu) -> None:
    sock = raw_qemu.take_socket()
    fd = sock.detach()
    with QMPClient.connect(fd) as qmp:
        assert qmp.execute("query-name") == {}
    with pytest.raises(OSError):
        os.fstat(fd)  # the client owned it and closed it


def test_thousand_commands(raw_qemu: RawQemu) -> None:
    with QMPClient.connect(raw_qemu.take_socket()) as qmp:
        for i in range(1000):
            assert qmp.execute("query-status" if i % 2 else "query-name") is not None


def test_error_reply(raw_qemu: RawQemu) -> None:
    with QMPClient.connect(raw_qemu.take_socket()) as qmp:
        with pytest.raises(CommandError) as info:
            qmp.execute("device_del", {"id": "nope"})
        assert info.value.error_class == "DeviceNotFound"
        assert "nope" in info.value.desc
        assert info.value.command == "device_del" and info.value.arguments == {"id": "nope"}
        with pytest.raises(CommandError, match="CommandNotFound"):
            qmp.execute("no-such-command")
        assert qmp.execute("query-name") == {}  # still usable


def test_events_stop_resume_listeners_and_history(raw_qemu: RawQemu) -> None:
    seen: list[Event] = []
    with QMPClient.connect(raw_qemu.take_socket(), history=3) as qmp:
        handle = qmp.add_listener(seen.append, name="RESUME")
        qmp.execute("stop")
        qmp.execute("cont")
        assert qmp.wait_event("RESUME").name == "RESUME"  # out of order: consumes RESUME only
        stop = qmp.wait_event({"STOP", "X"})
        assert stop.name == "STOP" and stop.timestamp > 1e9
        assert [e.name for e in seen] == ["RESUME"]
        qmp.remove_listener(handle)
        with pytest.raises(ValueError):
            qmp.remove_listener(handle)
        for _ in range(3):
            qmp.execute("stop")
            qmp.execute("cont")
        qmp.execute("query-name")
        assert qmp.dropped_events == 3  # 6 events into a queue of 3
        assert [e.name for e in qmp.get_events()] == ["RESUME", "STOP", "RESUME"]
        with pytest.raises(Timeout, match=r"event 'STOP' .*0\.05 s|0\.05 s.*event 'STOP'"):
            qmp.wait_event("STOP", timeout=0.05)
        assert qmp.execute("query-name") == {}  # an event timeout does not break it


def test_wait_event_match_on_data(raw_qemu: RawQemu) -> None:
    with QMPClient.connect(raw_qemu.take_socket()) as qmp:
        qmp.execute("quit")
        with pytest.raises(Disconnected, match="no event 'SHUTDOWN'"):
            qmp.wait_event("SHUTDOWN", match={"reason": "guest-panic"}, timeout=5)
        # the real one was queued, and is still there
        ev = qmp.get_events()
        assert [(e.name, e.data["reason"]) for e in ev] == [("SHUTDOWN", "host-qmp-quit")]


def test_events_iterator_ends_when_connection_closes(raw_qemu: RawQemu) -> None:
    with QMPClient.connect(raw_qemu.take_socket()) as qmp:
        qmp.execute("stop")
        qmp.execute("quit")
        names = [e.name for e in qmp.events(timeout=5)]
        assert names == ["STOP", "SHUTDOWN"]


def test_oob(raw_qemu: RawQemu) -> None:
    with QMPClient.connect(raw_qemu.take_socket(), oob=True) as qmp:
        assert isinstance(qmp.execute_oob("query-yank"), list)
        with pytest.raises(CommandError, match="does not support OOB"):
            qmp.execute_oob("query-status")


def test_oob_needs_negotiation(raw_qemu: RawQemu) -> None:
    with QMPClient.connect(raw_qemu.take_socket()) as qmp:
        with pytest.raises(QMPError, match="OOB was not negotiated"):
            qmp.execute_oob("query-yank")


def test_fd_passing_getfd_and_add_fd(raw_qemu: RawQemu) -> None:
    r, w = os.pipe()
    try:
        with QMPClient.connect(raw_qemu.take_socket()) as qmp:
            qmp.send_fd(r, "mypipe")
            qmp.execute("closefd", {"fdname": "mypipe"})  # known to QEMU, else an error
            with pytest.raises(CommandError):
                qmp.execute("closefd", {"fdname": "mypipe"})
            added = qmp.add_fd(w, fdset_id=7, opaque="hello")
            assert added["fdset-id"] == 7
            fdsets = qmp.execute("query-fdsets")
            [fdset] = [s for s in fdsets if s["fdset-id"] == 7]
            assert fdset["fds"] == [{"fd": added["fd"], "opaque": "hello"}]
            with pytest.raises(ValueError, match="not an open file descriptor"):
                qmp.send_fd(9999, "x")
    finally:
        os.close(r)
        os.close(w)


def test_quit_then_clean_close(raw_qemu: RawQemu) -> None:
    qmp = QMPClient.connect(raw_qemu.take_socket())
    assert qmp.execute("quit") == {}
    assert raw_qemu.proc.wait(10) == 0
    with pytest.raises(Disconnected, match="'quit' was sent"):
        qmp.execute("query-status")
    assert qmp.wait_event("SHUTDOWN").data["reason"] == "host-qmp-quit"
    with pytest.raises(Disconnected, match="QEMU quit"):
        qmp.wait_event("SHUTDOWN", timeout=5)
    qmp.close()
    qmp.close()  # idempotent
    assert qmp.closed


def test_calls_after_close_raise_disconnected_at_once(raw_qemu: RawQemu) -> None:
    qmp = QMPClient.connect(raw_qemu.take_socket())
    qmp.close()
    t0 = time.monotonic()
    for call in (
        lambda: qmp.execute("query-status"),
        lambda: qmp.wait_event("STOP"),
        lambda: qmp.send_fd(0, "x"),
    ):
        with pytest.raises(Disconnected, match="closed by the client"):
            call()
    assert time.monotonic() - t0 < 1


def test_close_from_another_thread_wakes_a_blocked_call(raw_qemu: RawQemu) -> None:
    qmp = QMPClient.connect(raw_qemu.take_socket())
    errors: list[BaseException] = []
    started = threading.Event()

    def waiter() -> None:
        try:
            qmp.wait_event("NEVER", timeout=30)
        except Disconnected as exc:
            errors.append(exc)

    # listeners run in the thread that read the event: once `stop` (issued
    # here) has its reply, the STOP event before it was read by the waiter,
    # which is therefore inside wait_event, reading
    t = threading.Thread(target=waiter)
    qmp.add_listener(lambda ev: started.set() if threading.current_thread() is t else None)
    t.start()
    for _ in range(50):  # until the waiter has become the reader
        qmp.execute("stop")
        qmp.execute("cont")
        if started.wait(0.1):
            break
    assert started.is_set(), "the waiter never read an event"
    t0 = time.monotonic()
    qmp.close()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 2
    assert len(errors) == 1 and isinstance(errors[0], Disconnected)
    assert qmp.closed


def test_command_in_flight_when_qemu_dies(raw_qemu: RawQemu) -> None:
    qmp = QMPClient.connect(raw_qemu.take_socket())
    os.kill(raw_qemu.proc.pid, signal.SIGSTOP)  # the command will sit unanswered
    result: list[BaseException] = []
    t = threading.Thread(
        target=lambda: result.append(_catch(lambda: qmp.execute("query-status", timeout=30)))
    )
    t.start()
    wait_until(lambda: blocked_reading(t), what="execute waiting for its reply")
    t0 = time.monotonic()
    os.kill(raw_qemu.proc.pid, signal.SIGKILL)
    t.join(5)
    assert time.monotonic() - t0 < 1
    assert isinstance(result[0], Disconnected), result
    assert "peer closed" in str(result[0])
    qmp.close()


def _catch(fn: object) -> BaseException:
    try:
        fn()  # type: ignore[operator]
    except BaseException as exc:
        return exc
    raise AssertionError("no exception")


def test_zero_timeout_is_a_timeout_not_a_socket_error(raw_qemu: RawQemu) -> None:
    with QMPClient.connect(raw_qemu.take_socket()) as qmp:
        with pytest.raises(Timeout, match="after 0 s"):
            qmp.wait_event("NEVER", timeout=0)
        assert qmp.execute("query-name") == {}  # an event wait does not break it
