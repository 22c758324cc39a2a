"""What the QMP shell accepts on a line, turned into commands (no I/O).

The syntax is qmp-shell's, made stricter where qmp-shell silently guessed:

- `command key=value ...`; `a.b=1` nests (`{"a": {"b": 1}}`); a key set twice
  is an error.
- A value is JSON when it parses as JSON (`{"driver": "file"}`, `[1, 2]`,
  `"text"`, `12`, `1.5`, `null`); `true`/`false` in any case; Python-style
  literals too (`{'a': True, 'b': None}`, and qmp-shell's `{'k'='v'}`); a
  single-quoted `'a b'` is that string; anything else is the word itself
  (`id=net0`, `filename=/tmp/x`). A value starting with `{` or `[` that is no
  literal is refused rather than sent as a string.
- Spaces inside quotes or brackets do not split words, so JSON can be pasted
  as `json.dumps` writes it.
- A line that is a JSON object is sent as it is (`{"execute": ...}`).
- `transaction(` starts a transaction: each following line (or each part
  between `;` words) is an action `type key=value ...`; `)` sends them all as
  one `transaction`. `transaction( a x=1 ; b y=2 )` fits on one line.

Words that were typed bare (`id=123`) remember their text, so that a string
argument given digits can be sent as the string QEMU expects (`coerce`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

from ..qmp.schema import Schema

Path = tuple[str, ...]


class ParseError(ValueError):
    """The line cannot be turned into a command; nothing is sent."""


@dataclass
class Command:
    """One QMP command as typed: name, arguments, and the source text of the
    values that were bare words (by key path), for `coerce`."""

    name: str
    arguments: dict[str, Any] | None
    bare: dict[Path, str] = field(default_factory=dict)


# -- words ---------------------------------------------------------------------

_OPEN = {"{": "}", "[": "]"}


def split_words(line: str, *, partial: bool = False) -> list[str]:
    """Split at blanks outside quotes and brackets. `partial` (completion):
    an unterminated quote or bracket ends the last word instead of failing."""
    words: list[str] = []
    word: list[str] = []
    closers: list[str] = []
    quote = ""
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            word.append(c)
            if c == "\\" and i + 1 < len(line):
                word.append(line[i + 1])
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
            word.append(c)
        elif c in _OPEN:
            closers.append(_OPEN[c])
            word.append(c)
        elif closers and c == closers[-1]:
            closers.pop()
            word.append(c)
        elif c.isspace() and not closers:
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(c)
        i += 1
    if quote and not partial:
        raise ParseError(f"unterminated {quote} in {''.join(word)!r}")
    if word:
        words.append("".join(word))
    return words


# -- values --------------------------------------------------------------------


class _Literal:
    """A lenient literal reader: JSON plus Python's quotes and constants and
    qmp-shell's `=` between key and value."""

    _CONST: ClassVar[dict[str, Any]] = {"true": True, "false": False, "null": None,
                                        "True": True, "False": False, "None": None}  # fmt: skip
    _NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?")
    _NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def parse(self) -> Any:
        value = self.value()
        self.blank()
        if self.pos != len(self.text):
            self.fail("unexpected text")
        return value

    def fail(self, what: str) -> NoReturn:
        raise ParseError(f"{what} at offset {self.pos} of {self.text!r}")

    def blank(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.blank()
        return self.text[self.pos : self.pos + 1]

    def value(self) -> Any:
        c = self.peek()
        if c == "{":
            return self.container("}", self.member)
        if c == "[":
            return self.container("]", self.value)
        if c in "\"'":
            return self.string()
        number = self._NUMBER.match(self.text, self.pos)
        if number:
            self.pos = number.end()
            return json.loads(number.group())
        name = self._NAME.match(self.text, self.pos)
        if name and name.group() in self._CONST:
            self.pos = name.end()
            return self._CONST[name.group()]
        self.fail("expected a value")

    def container(self, close: str, item: Any) -> Any:
        self.pos += 1
        items: list[Any] = []
        while self.peek() != close:
            if not self.peek():
                self.fail(f"missing {close!r}")
            items.append(item())
            if self.peek() == ",":
                self.pos += 1
            elif not self.peek():
                self.fail(f"missing {close!r}")
            elif self.peek() != close:
                self.fail(f"expected ',' or {close!r}")
        self.pos += 1
        return dict(items) if close == "}" else items

    def member(self) -> tuple[str, Any]:
        if self.peek() in ("'", '"'):
            key = self.string()
        else:
            name = self._NAME.match(self.text, self.pos)
            if not name:
                self.fail("expected a key")
            key, self.pos = name.group(), name.end()
        if self.peek() not in (":", "="):
            self.fail("expected ':'")
        self.pos += 1
        return key, self.value()

    def string(self) -> str:
        quote = self.text[self.pos]
        end = self.pos + 1
        while end < len(self.text) and self.text[end] != quote:
            end += 2 if self.text[end] == "\\" else 1
        if end >= len(self.text):
            self.fail(f"unterminated {quote}")
        body = self.text[self.pos + 1 : end]
        self.pos = end + 1
        if quote == "'":  # as a JSON string: \' means ', a bare " needs escaping
            body = re.sub(r'\\(.)|"', lambda m: '\\"' if m.group() == '"' else
                          ("'" if m.group(1) == "'" else m.group()), body)  # fmt: skip
        try:
            text: str = json.loads(f'"{body}"', strict=False)
        except ValueError as exc:
            raise ParseError(f"bad string {quote}{body}{quote}: {exc}") from None
        return text


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_value(text: str) -> tuple[Any, bool]:
    """The value of `key=text`, and whether it was a bare word (no quotes or
    brackets: its text could stand for a string)."""
    try:
        return json.loads(text, parse_constant=_no_constant), text[0] not in '"[{'
    except ValueError:
        pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true", True
    if text and text[0] in "{['":
        return _Literal(text).parse(), False
    return text, False


def _assign(args: dict[str, Any], key: str, value: Any) -> None:
    target = args
    *parents, leaf = key.split(".")
    if not all(parents) or not leaf:
        raise ParseError(f"bad key {key!r}")
    for i, part in enumerate(parents):
        nested = target.setdefault(part, {})
        if not isinstance(nested, dict):
            where = ".".join(parents[: i + 1])
            raise ParseError(f"{where!r} is set to a value and used as an object")
        target = nested
    if leaf in target:
        if isinstance(target[leaf], dict) and isinstance(value, dict):
            overlap = set(target[leaf]) & set(value)
            if not overlap:
                target[leaf].update(value)
                return
        raise ParseError(f"{key!r} is set twice")
    target[leaf] = value


def parse_arguments(words: list[str]) -> tuple[dict[str, Any], dict[Path, str]]:
    """`key=value` words → (arguments, bare words' text by key path)."""
    args: dict[str, Any] = {}
    bare: dict[Path, str] = {}
    for word in words:
        key, sep, raw = word.partition("=")
        if not sep or not key:
            raise ParseError(f"expected key=value, got {word!r}")
        try:
            value, is_bare = parse_value(raw)
        except ParseError as exc:
            raise ParseError(f"{key}: {exc}") from None
        _assign(args, key, value)
        if is_bare:
            bare[tuple(key.split("."))] = raw
    return args, bare


def parse_json_command(line: str) -> Command:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise ParseError(f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("execute"), str):
        raise ParseError('a JSON command needs "execute": "<name>"')
    given = obj.get("arguments")
    if given is not None and not isinstance(given, dict):
        raise ParseError('"arguments" must be a JSON object')
    return Command(obj["execute"], given)


def parse_line(line: str) -> Command:
    """One command line (no transaction syntax) → `Command`."""
    line = line.strip()
    if line.startswith("{"):
        return parse_json_command(line)
    words = split_words(line)
    if not words:
        raise ParseError("empty command")
    args, bare = parse_arguments(words[1:])
    return Command(words[0], args or None, bare)


# -- transactions --------------------------------------------------------------


class Reader:
    """Turns lines into commands, holding the actions of an open
    `transaction(` between lines. `feed` returns the commands a line completes
    (none while a transaction is open)."""

    def __init__(self) -> None:
        self.actions: list[dict[str, Any]] | None = None  # None: no transaction open
        self.action_bare: list[dict[Path, str]] = []

    @property
    def in_transaction(self) -> bool:
        return self.actions is not None

    def feed(self, line: str, check: Callable[[Command], None] | None = None) -> list[Command]:
        """The commands `line` completes; a line that fails changes nothing.
        `check` (validation) sees the transaction after each line's actions,
        before `)` closes it: a bad last action leaves the transaction open."""
        kept = None if self.actions is None else len(self.actions)
        try:
            return self._feed(line, check)
        except ValueError:  # ParseError, or the ValidationError of `check`
            if kept is None:
                self.actions, self.action_bare = None, []
            else:
                self.rollback(kept)
            raise

    def _feed(self, line: str, check: Callable[[Command], None] | None) -> list[Command]:
        stripped = line.strip()
        if self.actions is None and stripped.startswith("{"):
            return [parse_json_command(stripped)]
        words = split_words(stripped)
        if self.actions is None:
            if words[:1] == ["transaction("]:
                words = words[1:]
            elif words[:2] == ["transaction", "("]:
                words = words[2:]
            else:
                return [parse_line(stripped)] if words else []
            self.actions, self.action_bare = [], []
        close = bool(words) and words[-1] == ")"
        if close:
            words = words[:-1]
        if ")" in words:
            raise ParseError("unexpected text after ')'")
        part: list[str] = []
        for word in [*words, ";"]:
            if word != ";":
                part.append(word)
            elif part:
                self._action(part)
                part = []
        if check is not None:
            check(self.pending())
        if not close:
            return []
        command = self.pending()
        self.actions, self.action_bare = None, []
        return [command]

    def _action(self, words: list[str]) -> None:
        assert self.actions is not None
        data, bare = parse_arguments(words[1:])
        self.actions.append({"type": words[0], "data": data})
        self.action_bare.append(bare)

    def pending(self) -> Command:
        """The open transaction as it would be sent now."""
        actions = self.actions or []
        bare = {
            ("actions", str(i), "data", *path): text
            for i, paths in enumerate(self.action_bare)
            for path, text in paths.items()
        }
        return Command("transaction", {"actions": actions}, bare)

    def rollback(self, count: int) -> None:
        """Keep only the first `count` actions (the others failed validation)."""
        if self.actions is not None:
            del self.actions[count:], self.action_bare[count:]

    def cancel(self) -> None:
        self.actions = None


# -- schema-directed fix-ups -----------------------------------------------------


def _type_at(schema: Schema, type_name: str, data: Any, path: Path) -> str | None:
    for part in path:
        t = schema.types.get(type_name, {})
        if t.get("meta-type") == "alternate":  # the branch that fits the container given
            kind = "object" if isinstance(data, Mapping) else "array"
            fits = [m["type"] for m in t.get("members", [])
                    if schema.types.get(m["type"], {}).get("meta-type") == kind]  # fmt: skip
            if not fits:
                return None
            type_name, t = fits[0], schema.types[fits[0]]
        if t.get("meta-type") == "array":
            if not (isinstance(data, list) and part.isdigit() and int(part) < len(data)):
                return None
            type_name, data = t["element-type"], data[int(part)]
            continue
        if t.get("meta-type") != "object" or not isinstance(data, Mapping):
            return None
        member = schema.members(type_name, data).get(part)
        if member is None:
            return None
        type_name, data = member.type, data.get(part)
    return type_name


def coerce(schema: Schema, command: Command) -> None:
    """Where the schema wants a string and the user typed a bare word that
    read as a number, boolean or null (`id=123`), send the word's text."""
    cmd = schema.commands.get(command.name)
    if cmd is None or not command.arguments:
        return
    args = command.arguments
    for path, text in command.bare.items():
        type_name = _type_at(schema, cmd.get("arg-type", ""), args, path)
        t = schema.types.get(type_name or "", {})
        if t.get("meta-type") == "builtin" and t.get("json-type") == "string":
            target: Any = args
            for part in path[:-1]:
                target = target[int(part)] if isinstance(target, list) else target[part]
            if not isinstance(target[path[-1]], str):
                target[path[-1]] = text
