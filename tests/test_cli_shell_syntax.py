"""The QMP shell's line syntax (no QEMU): JSON values, nested keys, qmp-shell's
forms, transactions."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmpilot.cli.qmp_syntax import Command, ParseError, Reader, parse_line, split_words

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
keys = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)


@given(keys, json_values, st.sampled_from([None, 2]), st.booleans())
def test_any_json_value_round_trips(
    key: str, value: Any, indent: int | None, compact: bool
) -> None:
    seps = (",", ":") if compact else None
    text = json.dumps(value, indent=indent, separators=seps)
    if indent:
        text = text.replace("\n", " ")  # one line, as typed
    cmd = parse_line(f"some-command {key}={text}")
    assert cmd.arguments == {key: value}


@given(st.lists(keys, min_size=1, max_size=4, unique=True), json_values)
def test_dotted_keys_nest(path: list[str], value: Any) -> None:
    cmd = parse_line(f"c {'.'.join(path)}={json.dumps(value)}")
    expected: Any = value
    for part in reversed(path):
        expected = {part: expected}
    assert cmd.arguments == expected


@given(st.text(max_size=20))
def test_single_quoted_text_is_that_string(text: str) -> None:
    quoted = "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    assert parse_line(f"c k={quoted}").arguments == {"k": text}


def test_the_issue_case_a_json_object_is_sent_as_an_object() -> None:
    cmd = parse_line('blockdev-add node-name=n file={"driver":"file","filename":"x"}')
    assert cmd.arguments == {"node-name": "n", "file": {"driver": "file", "filename": "x"}}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("net1", "net1"),  # a bare word is itself
        ("/tmp/x.img", "/tmp/x.img"),
        ("12", 12), ("-3", -3), ("1.5", 1.5), ("1e3", 1000.0),
        ("true", True), ("False", False), ("TRUE", True), ("null", None),
        ('"12"', "12"), ("'a b'", "a b"), ('"a\\"b"', 'a"b'), ("''", ""), ("", ""),
        ("NaN", "NaN"), ("Infinity", "Infinity"),  # not JSON: words
        ("[1, 'two', None, True]", [1, "two", None, True]),  # Python literals
        ("{'key':'value','obj'={'prop':\"value\"}}", {"key": "value", "obj": {"prop": "value"}}),
        ("{a: 1, b: [1,],}", {"a": 1, "b": [1]}),  # bare keys, trailing commas
    ],
)  # fmt: skip
def test_values(value: str, expected: Any) -> None:
    assert parse_line(f"c k={value}").arguments == {"k": expected}


def test_bare_words_remember_their_text() -> None:
    cmd = parse_line("c id=123 n=1.50 b=TRUE s=x q='7' j={\"a\":1}")
    assert cmd.bare == {("id",): "123", ("n",): "1.50", ("b",): "TRUE"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("c k", "expected key=value"),
        ("c =1", "expected key=value"),
        ("c k=1 k=2", "'k' is set twice"),
        ("c k=1 k.a=2", "'k' is set to a value and used as an object"),
        ("c k.a=1 k.a=2", "'k.a' is set twice"),
        ("c k.=1", "bad key"),
        ("c k={a", "k: expected ':'"),
        ("c k={'a':1", "k: missing '}'"),
        ("c k=[1 2]", "expected ',' or ']'"),
        ('c k="x', "unterminated"),
        ("c k={'a': nope}", "expected a value"),
        ("", "empty command"),
        ("{nope", "invalid JSON"),
        ('{"arguments": {}}', '"execute"'),
        ('{"execute": "x", "arguments": [1]}', "must be a JSON object"),
    ],
)
def test_errors_say_what_is_wrong(line: str, message: str) -> None:
    with pytest.raises(ParseError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Reader().feed(line) if line else parse_line(line)


def test_objects_given_twice_merge_when_they_do_not_overlap() -> None:
    cmd = parse_line('c a={"x": 1} a.y=2')
    assert cmd.arguments == {"a": {"x": 1, "y": 2}}


def test_words_split_outside_quotes_and_brackets() -> None:
    assert split_words(' a  b={"c d": [1, 2]} e=\'f g\' h="i j" ') == [
        "a", 'b={"c d": [1, 2]}', "e='f g'", 'h="i j"',
    ]  # fmt: skip
    assert split_words('a b="open', partial=True) == ["a", 'b="open']


def test_a_json_command_line_is_sent_as_it_is() -> None:
    cmd = parse_line('{"execute": "qom-get", "arguments": {"path": "/", "property": "type"}}')
    assert cmd == Command("qom-get", {"path": "/", "property": "type"})


def test_transaction_over_lines() -> None:
    r = Reader()
    assert r.feed("transaction(") == [] and r.in_transaction
    assert r.feed("block-dirty-bitmap-add node=drive0 name=bitmap1") == []
    assert r.feed("block-dirty-bitmap-clear node=drive0 name=bitmap0") == []
    [cmd] = r.feed(")")
    assert not r.in_transaction
    assert cmd.name == "transaction"
    assert cmd.arguments == {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "drive0", "name": "bitmap1"}},
        {"type": "block-dirty-bitmap-clear", "data": {"node": "drive0", "name": "bitmap0"}},
    ]}  # fmt: skip


def test_transaction_on_one_line_and_closing_on_an_action_line() -> None:
    [cmd] = Reader().feed("transaction( abort ; x a=1 )")
    assert cmd.arguments == {"actions": [{"type": "abort", "data": {}},
                                         {"type": "x", "data": {"a": 1}}]}  # fmt: skip
    assert cmd.bare == {("actions", "1", "data", "a"): "1"}
    r = Reader()
    r.feed("transaction (")
    [cmd] = r.feed("abort )")  # qmp-shell: `)` ends the action line too
    assert cmd.arguments == {"actions": [{"type": "abort", "data": {}}]}
    [cmd] = Reader().feed("transaction( )")
    assert cmd.arguments == {"actions": []}


def test_a_bad_line_in_a_transaction_changes_nothing() -> None:
    r = Reader()
    r.feed("transaction( a x=1")
    with pytest.raises(ParseError):
        r.feed("b y=1 ; c z")
    assert r.in_transaction and r.pending().arguments == {
        "actions": [{"type": "a", "data": {"x": 1}}]
    }
    with pytest.raises(ParseError, match="after"):
        r.feed(") x")
    with pytest.raises(ParseError):  # a failed opening line leaves no transaction open
        Reader().feed("transaction( a x")
    fresh = Reader()
    with pytest.raises(ParseError):
        fresh.feed("transaction( a x")
    assert not fresh.in_transaction


def test_a_transaction_checked_line_by_line_stays_open_when_its_last_action_fails() -> None:
    def check(cmd: Command) -> None:
        assert cmd.arguments is not None
        if any(a["type"] == "bad" for a in cmd.arguments["actions"]):
            raise ValueError("bad action")

    r = Reader()
    r.feed("transaction( good x=1", check)
    with pytest.raises(ValueError, match="bad action"):
        r.feed("bad y=2 )", check)
    assert r.in_transaction
    [cmd] = r.feed(")", check)
    assert cmd.arguments == {"actions": [{"type": "good", "data": {"x": 1}}]}
    with pytest.raises(ValueError):
        r.feed("transaction( bad )", check)
    assert not r.in_transaction
