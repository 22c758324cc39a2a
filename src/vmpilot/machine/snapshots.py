"""Whole-VM snapshots on QEMU's job-based commands (`snapshot-save`,
`snapshot-load`, `snapshot-delete`, QEMU >= 6.0), written once as plans.

The VM state (RAM, devices) needs a qcow2 node to live on. With
`MachineConfig(snapshots=True)` (e.g. `image.config(snapshots=True)` for the
bundled guest) vmpilot makes one on first use: a qcow2 file in the VM's
private temp dir, created with `blockdev-create` jobs and added as node
`STATE_NODE`. It goes with the temp dir when the VM is cleaned up (or swept
if the controller died), so nothing is left behind. Otherwise the caller
names `vmstate` (and `devices`), or the first writable qcow2 disk is used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .._util.deadline import Deadline
from .._util.plan import Call, Plan
from ..errors import VMError
from . import jobs

SNAPSHOT_TIMEOUT = 120.0
STATE_NODE = "vmpilot-state"
STATE_FILE_NODE = "vmpilot-state-file"
STATE_SIZE = 1 << 20  # the disk's own size; the VM state is stored beside it, any size


def _writable_disks(blocks: list[dict[str, Any]]) -> list[str]:
    """Root node names of the writable disks (what a snapshot must cover)."""
    out = []
    for block in blocks:
        inserted = block.get("inserted")
        if inserted and not inserted.get("ro") and inserted.get("node-name"):
            out.append(inserted["node-name"])
    return out


def _nodes(
    qmp: object,
    state_dir: str | None,
    vmstate: str | None,
    devices: Sequence[str] | None,
    deadline: Deadline,
) -> Plan[dict[str, Any]]:
    blocks = yield Call("qmp", qmp, "query-block", None, jobs.reply())
    disks = _writable_disks(blocks)
    if vmstate is None:
        if state_dir is not None:
            yield from _ensure_state_node(qmp, state_dir, deadline)
            vmstate = STATE_NODE
        else:
            drivers = {
                b["inserted"]["node-name"]: b["inserted"].get("drv")
                for b in blocks
                if b.get("inserted")
            }
            vmstate = next((n for n in disks if drivers.get(n) == "qcow2"), None)
            if vmstate is None:
                raise VMError(
                    "no qcow2 disk to store the VM state on: launch with snapshots=True "
                    "(e.g. image.config(snapshots=True)) or pass vmstate='NODE'"
                )
    if devices is None:
        devices = [vmstate] + [n for n in disks if n != vmstate]
    return {"vmstate": vmstate, "devices": list(devices)}


def _ensure_state_node(qmp: object, state_dir: str, deadline: Deadline) -> Plan[None]:
    names = yield Call("qmp", qmp, "query-named-block-nodes", {"flat": True}, jobs.reply())
    if any(n.get("node-name") == STATE_NODE for n in names):
        return
    path = os.path.join(state_dir, "snapshot-state.qcow2")
    file_opts = {"driver": "file", "filename": path, "size": 0}
    yield from jobs.run_job(qmp, "blockdev-create", {"options": file_opts}, deadline, None, True)
    added = {"driver": "file", "node-name": STATE_FILE_NODE, "filename": path}
    yield Call("qmp", qmp, "blockdev-add", added, jobs.reply())
    qcow2 = {"driver": "qcow2", "file": STATE_FILE_NODE, "size": STATE_SIZE}
    yield from jobs.run_job(qmp, "blockdev-create", {"options": qcow2}, deadline, None, True)
    node = {"driver": "qcow2", "node-name": STATE_NODE, "file": STATE_FILE_NODE}
    yield Call("qmp", qmp, "blockdev-add", node, jobs.reply())


def save(
    qmp: object,
    name: str,
    state_dir: str | None,
    vmstate: str | None,
    devices: Sequence[str] | None,
    deadline: Deadline,
) -> Plan[jobs.Job]:
    return (yield from _snapshot("snapshot-save", qmp, name, state_dir, vmstate, devices, deadline))


def load(
    qmp: object,
    name: str,
    state_dir: str | None,
    vmstate: str | None,
    devices: Sequence[str] | None,
    deadline: Deadline,
) -> Plan[jobs.Job]:
    return (yield from _snapshot("snapshot-load", qmp, name, state_dir, vmstate, devices, deadline))


def _snapshot(
    command: str,
    qmp: object,
    name: str,
    state_dir: str | None,
    vmstate: str | None,
    devices: Sequence[str] | None,
    deadline: Deadline,
) -> Plan[jobs.Job]:
    """snapshot-save and snapshot-load take the same nodes and a tag."""
    args = yield from _nodes(qmp, state_dir, vmstate, devices, deadline)
    args["tag"] = name
    return (yield from jobs.run_job(qmp, command, args, deadline, None, True))


def delete(
    qmp: object,
    name: str,
    state_dir: str | None,
    devices: Sequence[str] | None,
    deadline: Deadline,
) -> Plan[jobs.Job]:
    if devices is None:
        devices = (yield from _nodes(qmp, state_dir, None, None, deadline))["devices"]
    args = {"tag": name, "devices": list(devices)}
    return (yield from jobs.run_job(qmp, "snapshot-delete", args, deadline, None, True))
