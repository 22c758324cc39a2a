"""What the connected QEMU accepts, from its own `query-qmp-schema`.

Used to complete command names, argument names and enum values in the shell,
and (opt-in, `validate=True` on the clients) to refuse a malformed command
before it is sent, with a "did you mean ...?" for typos. The schema is QEMU's
introspection output: types are referred to by (often numeric) names.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ValidationError as ValidationError  # defined with every error, in errors.py

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "int": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


class Member:
    __slots__ = ("name", "optional", "type")

    def __init__(self, name: str, type: str, optional: bool) -> None:
        self.name = name
        self.type = type
        self.optional = optional

    def __repr__(self) -> str:
        return f"Member({self.name!r}, {self.type!r}, optional={self.optional})"


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


class Schema:
    """An index over the entries of `query-qmp-schema`."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.types: dict[str, dict[str, Any]] = {}
        self.commands: dict[str, dict[str, Any]] = {}
        self.events: dict[str, dict[str, Any]] = {}
        for entry in entries:
            meta = entry.get("meta-type")
            if meta == "command":
                self.commands[entry["name"]] = entry
            elif meta == "event":
                self.events[entry["name"]] = entry
            else:
                self.types[entry["name"]] = entry

    # -- lookups for completion -------------------------------------------

    def command_names(self) -> list[str]:
        return sorted(self.commands)

    def arguments(self, command: str, data: Mapping[str, Any] | None = None) -> dict[str, Member]:
        """The arguments `command` takes (for a union, those of the branch
        that `data` selects, when it selects one)."""
        cmd = self.commands.get(command)
        if cmd is None:
            return {}
        return self.members(cmd.get("arg-type", ""), data or {})

    def members(self, type_name: str, data: Mapping[str, Any]) -> dict[str, Member]:
        t = self.types.get(type_name, {})
        out = {
            m["name"]: Member(m["name"], m["type"], "default" in m) for m in t.get("members", [])
        }
        tag = t.get("tag")
        if tag and tag in data:
            for variant in t.get("variants", []):
                if variant.get("case") == data[tag]:
                    out.update(self.members(variant["type"], data))
        return out

    def enum_values(self, type_name: str) -> list[str]:
        t = self.types.get(type_name, {})
        if t.get("meta-type") != "enum":
            return []
        return list(t.get("values") or [m["name"] for m in t.get("members", [])])

    # -- validation --------------------------------------------------------

    def validate(self, command: str, arguments: Mapping[str, Any] | None) -> None:
        """Raise `ValidationError` if `command(arguments)` cannot be right."""
        if command not in self.commands:
            raise ValidationError(
                f"QEMU has no command {command!r}{_suggest(command, self.commands)}"
            )
        arg_type = self.commands[command].get("arg-type", "")
        self._check(arg_type, dict(arguments or {}), command)

    def _check(self, type_name: str, value: Any, where: str) -> None:
        t = self.types.get(type_name)
        if t is None:
            return  # not described: nothing to check
        meta = t.get("meta-type")
        if meta == "builtin":
            json_type = t.get("json-type", "value")
            ok = _JSON_TYPES.get(json_type)
            if ok is not None and (
                not isinstance(value, ok) or (json_type != "boolean" and isinstance(value, bool))
            ):
                raise ValidationError(
                    f"{where} must be a JSON {json_type}, not {type(value).__name__} {value!r}"
                )
        elif meta == "enum":
            values = self.enum_values(type_name)
            if value not in values:
                raise ValidationError(
                    f"{where} must be one of {values}, not {value!r}"
                    + (_suggest(value, values) if isinstance(value, str) else "")
                )
        elif meta == "array":
            if not isinstance(value, list):
                raise ValidationError(f"{where} must be a JSON array, not {value!r}")
            for i, item in enumerate(value):
                self._check(t["element-type"], item, f"{where}[{i}]")
        elif meta == "object":
            if not isinstance(value, Mapping):
                raise ValidationError(f"{where} must be a JSON object, not {value!r}")
            members = self.members(type_name, value)
            for key in value:
                if key not in members:
                    raise ValidationError(
                        f"{where} has no argument {key!r}{_suggest(key, members)}"
                        f" (it takes: {', '.join(sorted(members)) or 'nothing'})"
                    )
            for name, member in members.items():
                if name in value:
                    self._check(member.type, value[name], f"{where}.{name}")
                elif not member.optional:
                    raise ValidationError(f"{where} needs argument {name!r}")
        elif meta == "alternate":
            errors = []
            for alt in t.get("members", []):
                try:
                    self._check(alt["type"], value, where)
                    return
                except ValidationError as exc:
                    errors.append(str(exc))
            raise ValidationError(f"{where} fits none of its alternatives: {'; '.join(errors)}")
