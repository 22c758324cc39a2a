"""Schema awareness against the real schema of the installed QEMU."""

from __future__ import annotations

import pytest
from conftest import RawQemu, run_async

from vmpilot.qmp import AsyncQMPClient, QMPClient
from vmpilot.qmp.schema import Schema, ValidationError


@pytest.fixture(scope="module")
def schema() -> Schema:
    q = RawQemu()
    try:
        with QMPClient.connect(q.take_socket()) as qmp:
            return qmp.fetch_schema()
    finally:
        q.stop()


def test_lookups(schema: Schema) -> None:
    assert "query-status" in schema.command_names() and len(schema.command_names()) > 100
    args = schema.arguments("device_del")
    assert list(args) == ["id"] and not args["id"].optional
    state_type = schema.types[schema.commands["query-status"]["ret-type"]]
    [status] = [m for m in state_type["members"] if m["name"] == "status"]
    assert {"running", "paused", "shutdown"} <= set(schema.enum_values(status["type"]))
    blk = schema.arguments("blockdev-add", {"driver": "file"})
    assert {"driver", "node-name", "filename"} <= set(blk)  # the union branch for driver=file
    assert "filename" not in schema.arguments("blockdev-add", {"driver": "null-co"})


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("query-statsu", None, "no command 'query-statsu'; did you mean .*'query-status'"),
        ("device_del", {}, "needs argument 'id'"),
        ("device_del", {"idd": "x"}, "no argument 'idd'; did you mean 'id'"),
        ("device_del", {"id": 5}, "must be a JSON string, not int"),
        ("cont", {"x": 1}, r"it takes: nothing"),
        ("blockdev-add", {"driver": "fiel", "node-name": "n"}, "did you mean 'file'"),
        ("blockdev-add", {"driver": "file", "node-name": "n"}, "needs argument 'filename'"),
        ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": "big"}, "JSON int"),
    ],
)
def test_validation_errors(schema: Schema, command: str, args: dict | None, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValidationError, match=message):
        schema.validate(command, args)


def test_valid_commands_pass(schema: Schema) -> None:
    schema.validate("query-status", None)
    schema.validate("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 4096})
    schema.validate("device_del", {"id": "x"})


def test_clients_validate_before_sending(raw_qemu: RawQemu) -> None:
    with QMPClient.connect(raw_qemu.take_socket(), validate=True) as qmp:
        with pytest.raises(ValidationError, match="did you mean .*'query-status'"):
            qmp.execute("query-statsu")
        assert qmp.execute("query-status")["running"] in (True, False)
        qmp.validate = False  # then QEMU answers itself
        with pytest.raises(Exception, match="CommandNotFound"):
            qmp.execute("query-statsu")


def test_async_client_validates() -> None:
    q = RawQemu()

    async def main() -> None:
        async with AsyncQMPClient.connect(q.take_socket(), validate=True) as qmp:
            with pytest.raises(ValidationError, match="needs argument 'id'"):
                await qmp.execute("device_del", {})
            assert await qmp.execute("query-name") == {}

    try:
        run_async(main())
    finally:
        q.stop()
