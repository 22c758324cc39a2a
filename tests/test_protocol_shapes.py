"""The protocol core raises only `ProtocolError`, whatever the input's shape
(issue 10, defect 3), owns end-of-stream, and gives immutable items."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmpilot.errors import ProtocolError
from vmpilot.qmp.protocol import (
    ConnectionLost,
    ErrorReply,
    Event,
    Greeting,
    Item,
    QMPProtocol,
    Reply,
)

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}\n'
)

# every JSON value, with unbounded integers and non-finite floats (Python's json
# writes them as Infinity/NaN, and reads them back, as QEMU's peer could send)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=1 << 60, max_value=1 << 1100)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# messages with the right keys and arbitrary shapes inside: what reaches deepest
shaped = st.one_of(
    st.builds(lambda v, c: {"QMP": {"version": v, "capabilities": c}}, values, values),
    st.builds(
        lambda q: {"QMP": {"version": {"qemu": q}, "capabilities": []}},
        st.dictionaries(st.sampled_from(["major", "minor", "micro"]), values),
    ),
    st.builds(lambda n, d, t: {"event": n, "data": d, "timestamp": t}, values, values, values),
    st.builds(
        lambda s, u: {"event": "E", "data": {}, "timestamp": {"seconds": s, "microseconds": u}},
        scalars,
        scalars,
    ),
    st.builds(lambda r, i: {"return": r, "id": i}, values, values | st.integers(0, 3)),
    st.builds(lambda e, i: {"error": e, "id": i}, values, values | st.integers(0, 3)),
    values,
)


def _use(items: list[Item]) -> None:
    """Touch every derived field: none may raise either."""
    for item in items:
        repr(item)
        if isinstance(item, Greeting):
            assert all(type(n) is int for n in item.qemu_version)
        elif isinstance(item, Event):
            assert isinstance(item.timestamp, float)
        elif isinstance(item, ErrorReply):
            item.error()


def _feed(p: QMPProtocol, data: bytes) -> None:
    try:
        _use(p.receive_data(data))
    except ProtocolError as exc:
        _use(exc.items)


@settings(max_examples=400, deadline=None)
@given(st.lists(shaped, min_size=1, max_size=5), st.booleans(), st.booleans())
def test_any_json_shape_raises_only_protocol_error(
    messages: list[object], greeted: bool, eof: bool
) -> None:
    p = QMPProtocol()
    if greeted:
        p.receive_data(GREETING)
        p.negotiate()
    for msg in messages:
        _feed(p, json.dumps(msg).encode() + b"\n")
    if eof:
        _feed(p, b"")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=80), max_size=6))
def test_any_bytes_after_the_greeting_raise_only_protocol_error(chunks: list[bytes]) -> None:
    p = QMPProtocol()
    p.receive_data(GREETING)
    for chunk in chunks:
        _feed(p, chunk)


def running() -> QMPProtocol:
    p = QMPProtocol()
    p.receive_data(GREETING)
    id_, _ = p.negotiate()
    p.receive_data(b'{"return": {}, "id": %d}\n' % id_)
    return p


@pytest.mark.parametrize(
    "line",
    [
        b'{"event": "E", "data": {}, "timestamp": {"seconds": 1'
        + b"0" * 400
        + b', "microseconds": 0}}',
        b'{"event": "E", "data": {}, "timestamp": {"seconds": 0, "microseconds": 1'
        + b"0" * 400
        + b"}}",
        b'{"event": "E", "data": {}, "timestamp": {"seconds": 1e999, "microseconds": 0}}',
    ],
)
def test_timestamp_out_of_range_is_a_protocol_error(line: bytes) -> None:
    p = running()
    id_, _ = p.send_command("query-status")
    with pytest.raises(ProtocolError, match="timestamp") as info:
        p.receive_data(b'{"return": {}, "id": %d}\n' % id_ + line + b"\n")
    assert [type(i) for i in info.value.items] == [Reply]  # what came before is kept


def test_greeting_version_out_of_range_is_a_protocol_error() -> None:
    p = QMPProtocol()
    with pytest.raises(ProtocolError, match="greeting version"):
        p.receive_data(
            b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 1e999}}, "capabilities": []}}\n'
        )


def test_end_of_stream_is_judged_by_the_core() -> None:
    p = running()
    p.send_command("query-status")
    assert p.receive_data(b"") == [ConnectionLost(False, "the peer closed it")]
    assert p.pending == []
    assert p.receive_data(b"") == []  # closed: nothing more

    p = running()
    quit_id, _ = p.send_command("quit")
    assert p.receive_data(b"") == [Reply(quit_id, {}, "quit"), ConnectionLost(True, "QEMU quit")]

    p = running()
    quit_id, _ = p.send_command("quit")
    assert p.receive_data(b'{"return": {}, "id": %d}\n' % quit_id) == [Reply(quit_id, {}, "quit")]
    assert p.receive_data(b"") == [ConnectionLost(True, "QEMU quit")]


def test_a_quit_whose_bytes_never_left_is_taken_back() -> None:
    p = running()
    quit_id, _ = p.send_command("quit")
    p.unsend(quit_id)
    assert not p.quit_sent and p.pending == []
    assert p.send_command("query-status")[0] == quit_id + 1


def test_items_are_immutable_and_keep_qemus_timestamp() -> None:
    p = running()
    (event,) = p.receive_data(
        b'{"event": "STOP", "data": {"a": 1}, "timestamp": {"seconds": 1700000000, "microseconds": 5}}\n'
    )
    assert isinstance(event, Event)
    assert (event.seconds, event.microseconds) == (1700000000, 5)
    assert event.timestamp == 1700000000.000005
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.name = "RESUME"  # type: ignore[misc]
    assert not hasattr(event, "__dict__")  # slots
    assert event == Event("STOP", {"a": 1}, 1700000000, 5)
