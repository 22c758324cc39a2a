"""The sans-I/O core: unit tests and property/fuzz tests."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmpilot.errors import CommandError, Disconnected, ProtocolError, QMPError
from vmpilot.qmp.protocol import (
    ConnectionLost,
    ErrorReply,
    Event,
    Greeting,
    QMPProtocol,
    Reply,
    State,
)

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, '
    b'"capabilities": ["oob"]}}\r\n'
)


def running(**kw: int) -> QMPProtocol:
    p = QMPProtocol(**kw)
    [g] = p.receive_data(GREETING)
    assert isinstance(g, Greeting)
    id_, data = p.negotiate()
    assert json.loads(data) == {"execute": "qmp_capabilities", "id": id_}
    [r] = p.receive_data(b'{"return": {}, "id": %d}\r\n' % id_)
    assert isinstance(r, Reply) and p.state is State.RUNNING
    return p


def test_greeting_then_negotiation_states() -> None:
    p = QMPProtocol()
    assert p.state is State.GREETING
    [g] = p.receive_data(GREETING)
    assert isinstance(g, Greeting)
    assert g.qemu_version == (7, 2, 22) and g.capabilities == ("oob",)
    assert p.state is State.GREETED
    with pytest.raises(QMPError, match="before capabilities"):
        p.send_command("query-status")
    id_, data = p.negotiate(["oob"])
    assert json.loads(data)["arguments"] == {"enable": ["oob"]}
    assert p.state is State.NEGOTIATING
    p.receive_data(b'{"return": {}, "id": %d}\n' % id_)
    assert p.state is State.RUNNING and p.oob_enabled


def test_negotiate_refuses_capability_not_offered() -> None:
    p = QMPProtocol()
    p.receive_data(GREETING.replace(b'"oob"', b""))
    with pytest.raises(QMPError, match="does not offer"):
        p.negotiate(["oob"])


def test_ids_are_unique_and_replies_matched() -> None:
    p = running()
    ids = [p.send_command("query-status")[0] for _ in range(100)]
    assert len(set(ids)) == 100
    out = p.receive_data(b"".join(b'{"return": %d, "id": %d}\n' % (i, i) for i in reversed(ids)))
    assert [(r.id, r.value) for r in out] == [(i, i) for i in reversed(ids)]  # type: ignore[union-attr]
    assert p.pending == []


def test_command_encoding_and_oob() -> None:
    p = running()
    with pytest.raises(QMPError, match="OOB was not negotiated"):
        p.send_command("x", oob=True)
    id_, data = p.send_command("device_add", {"driver": "x", "id": "ü,é"})
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert json.loads(data) == {
        "execute": "device_add",
        "arguments": {"driver": "x", "id": "ü,é"},
        "id": id_,
    }
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        p.send_command("x", {"a": object()})
    with pytest.raises(TypeError, match="non-empty str"):
        p.send_command("")
    with pytest.raises(TypeError, match="mapping"):
        p.send_command("x", ["a"])  # type: ignore[arg-type]


def test_error_reply_carries_class_desc_command_arguments() -> None:
    p = running()
    id_, _ = p.send_command("device_del", {"id": "nope"})
    [e] = p.receive_data(
        b'{"id": %d, "error": {"class": "DeviceNotFound", "desc": "Device \'nope\' not found"}}\n'
        % id_
    )
    assert isinstance(e, ErrorReply)
    err = e.error()
    assert isinstance(err, CommandError)
    assert (err.command, err.arguments, err.error_class) == (
        "device_del",
        {"id": "nope"},
        "DeviceNotFound",
    )
    assert "DeviceNotFound" in str(err) and "not found" in str(err)


def test_event_has_name_data_timestamp() -> None:
    p = running()
    [ev] = p.receive_data(
        b'{"timestamp": {"seconds": 10, "microseconds": 500000}, "event": "STOP"}\r\n'
    )
    assert ev == Event("STOP", {}, 10, 500000) and ev.timestamp == 10.5


def test_partial_lines_and_several_per_read() -> None:
    p = running()
    a, _ = p.send_command("a")
    b, _ = p.send_command("b")
    stream = b'{"return": 1, "id": %d}\n{"return": 2, "id": %d}\n' % (a, b)
    got = []
    for i in range(len(stream)):
        got += p.receive_data(stream[i : i + 1])
    assert [r.value for r in got] == [1, 2]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"[1, 2]\n", "not a JSON object"),
        (b"{nope\n", "not valid JSON"),
        (b'{"return": "\xff\xfe"}\n', "UTF-8"),
        (b'{"hello": 1}\n', "neither"),
        (b'{"return": {}, "id": 999}\n', "unknown id 999"),
        (b'{"return": {}, "id": true}\n', "valid id"),
        (b'{"return": {}}\n', "valid id"),
        (b'{"error": "x", "id": 1}\n', "unknown id|malformed"),
        (b'{"event": 5, "timestamp": {"seconds": 1, "microseconds": 1}}\n', "malformed event"),
        (b'{"event": "X", "timestamp": {"seconds": "1", "microseconds": 1}}\n', "timestamp"),
        (GREETING, "second greeting"),
        (b"[" * 100000 + b"\n", "not valid JSON"),
    ],
)
def test_violations_raise_protocol_error_with_bytes(data: bytes, match: str) -> None:
    p = running()
    with pytest.raises(ProtocolError, match=match) as info:
        p.receive_data(data)
    assert info.value.data and data.startswith(info.value.data[:50])
    # the connection is broken for good
    assert p.state is State.CLOSED
    with pytest.raises(ProtocolError):
        p.receive_data(b'{"return": {}, "id": 1}\n')
    with pytest.raises(Disconnected):
        p.send_command("query-status")


@pytest.mark.parametrize(
    "first",
    [
        b'{"return": {}, "id": 1}\n',
        b'{"QMP": {"version": 1, "capabilities": []}}\n',
        b'{"QMP": {"version": {}, "capabilities": [1]}}\n',
        b'{"QMP": []}\n',
        b'{"event": "X", "timestamp": {"seconds": 1, "microseconds": 1}}\n',
    ],
)
def test_a_greeting_that_is_not_one(first: bytes) -> None:
    with pytest.raises(ProtocolError):
        QMPProtocol().receive_data(first)


def test_items_before_a_violation_are_kept() -> None:
    p = running()
    ev = b'{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}}\n'
    with pytest.raises(ProtocolError) as info:
        p.receive_data(ev + b"garbage\n")
    assert [i.name for i in info.value.items] == ["STOP"]


def test_line_limit_bounds_the_buffer() -> None:
    p = running(max_line=1024)
    p.receive_data(b"x" * 1000)
    with pytest.raises(ProtocolError, match="1024-byte limit"):
        p.receive_data(b"x" * 100)
    p = running(max_line=1024)
    with pytest.raises(ProtocolError, match="limit"):
        p.receive_data(b'{"a": "' + b"y" * 2000 + b'"}\n')


def test_abandoned_command_late_reply_is_dropped() -> None:
    p = running()
    id_, _ = p.send_command("slow")
    p.abandon(id_)
    assert p.receive_data(b'{"return": {}, "id": %d}\n' % id_) == []
    assert p.late_replies == 1
    with pytest.raises(ProtocolError, match="unknown id"):  # but only once
        p.receive_data(b'{"return": {}, "id": %d}\n' % id_)


def test_quit_is_remembered_and_close_returns_pending() -> None:
    p = running()
    a, _ = p.send_command("query-status")
    q, _ = p.send_command("quit")
    assert p.quit_sent and p.quit_id == q
    assert p.close() == [a, q]
    assert p.receive_data(b"anything") == []  # closed on purpose: input ignored


def test_blank_lines_are_harmless() -> None:
    p = running()
    assert p.receive_data(b"\r\n\n  \n") == []


# -- properties -----------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def valid_sessions(draw: st.DrawFn) -> tuple[QMPProtocol, bytes, list[tuple[str, object]]]:
    """A negotiated core, a valid server stream, and what it must yield."""
    p = running()
    n = draw(st.integers(0, 12))
    ids = [p.send_command(f"cmd{i}")[0] for i in range(n)]
    order = draw(st.permutations(ids))
    chunks, expected = [], []
    for id_ in order:
        if draw(st.booleans()):
            ev = draw(st.dictionaries(st.text(max_size=5), json_values, max_size=3))
            chunks.append(
                json.dumps(
                    {"event": "E", "data": ev, "timestamp": {"seconds": 1, "microseconds": 2}}
                )
            )
            expected.append(("event", ev))
        value = draw(json_values)
        if draw(st.booleans()):
            chunks.append(json.dumps({"return": value, "id": id_}))
            expected.append(("reply", (id_, value)))
        else:
            chunks.append(json.dumps({"id": id_, "error": {"class": "C", "desc": str(value)}}))
            expected.append(("error", (id_, "C")))
    sep = draw(st.sampled_from(["\n", "\r\n"]))
    return p, "".join(c + sep for c in chunks).encode(), expected


@settings(max_examples=300, deadline=None)
@given(valid_sessions(), st.data())
def test_any_split_of_a_valid_stream_gives_the_same_items(
    session: tuple[QMPProtocol, bytes, list[tuple[str, object]]], data: st.DataObject
) -> None:
    p, stream, expected = session
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    got: list[tuple[str, object]] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        if cut == prev:
            continue  # b"" is end of stream, not an empty read
        for item in p.receive_data(stream[prev:cut]):
            if isinstance(item, Event):
                got.append(("event", item.data))
            elif isinstance(item, Reply):
                got.append(("reply", (item.id, item.value)))
            elif isinstance(item, ErrorReply):
                got.append(("error", (item.id, item.error_class)))
        prev = cut
    assert got == expected
    assert p.pending == []


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=10), st.booleans())
def test_garbage_only_yields_items_or_protocol_error(chunks: list[bytes], greeted: bool) -> None:
    p = running() if greeted else QMPProtocol()
    for _ in range(3):
        p.send_command("x") if greeted else None
    for chunk in chunks:
        try:
            items = p.receive_data(chunk)
        except ProtocolError:
            return
        allowed = (Greeting, Reply, ErrorReply, Event) if chunk else (Reply, ConnectionLost)
        assert all(isinstance(i, allowed) for i in items)


@settings(max_examples=300, deadline=None)
@given(st.lists(json_values, max_size=6), st.lists(st.integers(1, 40), max_size=6))
def test_arbitrary_json_objects_in_arbitrary_chunks(values: list[object], sizes: list[int]) -> None:
    p = running()
    p.send_command("x")
    stream = b"".join(json.dumps(v).encode() + b"\n" for v in values)
    pos = 0
    try:
        for size in [*sizes, len(stream)]:
            if pos >= len(stream):
                break  # b"" is end of stream
            items = p.receive_data(stream[pos : pos + size])
            assert all(isinstance(i, (Reply, ErrorReply, Event)) for i in items)
            pos += size
    except ProtocolError:
        pass
