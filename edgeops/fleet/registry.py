"""The device registry's rules (sans-I/O): a device's retained state message → what the fleet records of it.

An agent publishes its state retained on ``.../device/{id}/state`` on every (re)connect and after every change of
model; its last will (and a clean stop) replace it with ``{"online": false, ...}`` (docs/protocol.md). The
controller feeds every such message here and stores the result; telemetry only raises ``last_seen``.

Guarantees: :func:`parse_state` returns a :class:`StateUpdate` for any well-formed state message and raises
:class:`TelemetryRejected` (reason ``oversized``, ``malformed`` or ``device-mismatch``) for anything else; it
never trusts the payload's device id over the topic's. An empty retained payload (a deleted retained message)
is ``None``: nothing to record. It does not decide group membership for rollouts (the store and the planner do).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from edgeops import bounded_json
from edgeops.errors import TelemetryRejected
from edgeops.fleet.ingest import MAX_DEPTH
from edgeops.fleet.model import DeviceRecord
from edgeops.protocol import validate_segment

__all__ = ["MAX_STATE_BYTES", "StateUpdate", "parse_state"]

MAX_STATE_BYTES = 64 * 1024


@dataclass(frozen=True)
class StateUpdate:
    """One state message: either a full online record, or the device going offline (``record`` None)."""

    device_id: str
    online: bool
    received_at: float
    record: DeviceRecord | None  # online birth/state: the new record; offline: None
    offline_reason: str = ""


def _version(models: Any, which: str) -> str | None:
    model = models.get(which) if isinstance(models, dict) else None
    version = model.get("version") if isinstance(model, dict) else None
    return version if isinstance(version, str) else None


def _str(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    return value if isinstance(value, str) else None


def _groups(doc: dict[str, Any], device_id: str) -> tuple[str, ...]:
    raw = doc.get("groups", [])
    if not isinstance(raw, list):
        raise TelemetryRejected("malformed", f"{device_id}: groups is not a list")
    try:
        return tuple(sorted({validate_segment(g, "group") for g in raw}))
    except ValueError as exc:
        raise TelemetryRejected("malformed", f"{device_id}: {exc}") from None


def parse_state(device_id: str, payload: bytes, *, received_at: float) -> StateUpdate | None:
    """Read one state message of ``device_id`` (the id from the topic).

    Raises TelemetryRejected: ``oversized`` (over MAX_STATE_BYTES), ``malformed`` (not a JSON object, no boolean
    ``online``, bad groups), ``device-mismatch`` (the payload names another device)."""
    if not payload:
        return None
    if len(payload) > MAX_STATE_BYTES:
        raise TelemetryRejected("oversized", f"{device_id}: state of {len(payload)} bytes")
    if bounded_json.nesting_depth(payload) > MAX_DEPTH:  # before parsing: json.loads recurses in C
        raise TelemetryRejected("malformed", f"{device_id}: state nests deeper than {MAX_DEPTH} levels")
    try:
        doc = json.loads(payload, parse_constant=lambda c: math.nan)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: nested too deep
        raise TelemetryRejected("malformed", f"{device_id}: state is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("online"), bool):
        raise TelemetryRejected("malformed", f"{device_id}: state is not an object with a boolean 'online'")
    if doc.get("device", device_id) != device_id:
        raise TelemetryRejected("device-mismatch", f"state on {device_id}'s topic names {doc.get('device')!r}")
    if not doc["online"]:
        reason = _str(doc, "reason") or "offline"
        return StateUpdate(device_id, False, received_at, None, reason[:200])
    models = doc.get("models")
    slots = doc.get("slots") if isinstance(doc.get("slots"), dict) else {}
    previous = _version(models, "previous")
    if previous is None and isinstance(slots, dict):  # the slot map still knows the version rolled away from
        versions, prev_slot = slots.get("versions"), slots.get("previous")
        if isinstance(versions, dict) and isinstance(prev_slot, str) and isinstance(versions.get(prev_slot), str):
            previous = versions[prev_slot]
    record = DeviceRecord(
        device_id=device_id,
        online=True,
        last_seen=received_at,
        profile=_str(doc, "profile"),
        groups=_groups(doc, device_id),
        active_version=_version(models, "active"),
        previous_version=previous,
        health=_str(doc, "health"),
        agent_version=_str(doc, "agent_version"),
        state=doc,
    )
    return StateUpdate(device_id, True, received_at, record)
