"""What an operator does to rollouts, as store transactions: deploy, pause, resume, abort, roll a group back.

The CLI (``edgeops deploy``, ``edgeops rollout ...``, ``edgeops rollback``) and the demo call these; the running
fleet service (``edgeops.fleet.controller``) acts on what they record. Nothing here talks to the broker, so an
operation works whether or not the service runs, and a service restarted later picks it up.

Guarantees: an operation either records its whole effect (one store transaction per rollout) or raises
:class:`RolloutError` and records nothing. A new rollout to a group aborts the group's older active rollouts
(reason ``superseded by <id>``) so that two rollouts never send to the same device. Raises StorageError when the
store is down.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace

from edgeops.errors import RolloutError
from edgeops.fleet.model import (
    Approval,
    Rollout,
    RolloutKind,
    RolloutSpec,
    RolloutStatus,
)
from edgeops.fleet.rollout_planner import start_rollout
from edgeops.fleet.store import FleetStore
from edgeops.protocol import validate_segment

__all__ = ["Deployment", "abort", "deploy", "new_rollout_id", "pause", "resume", "rollback_group"]


@dataclass(frozen=True)
class Deployment:
    """A recorded rollout: what the service will run, and which group members it left out and why."""

    rollout: Rollout
    devices: int  # eligible devices (not skipped)
    skipped: tuple[tuple[str, str], ...]  # (device id, reason)
    superseded: tuple[str, ...]  # ids of the older rollouts to the same group now aborted


def new_rollout_id(now: float) -> str:
    """A sortable, unique rollout id: ``r-<unix seconds>-<6 hex>``."""
    return f"r-{int(now)}-{secrets.token_hex(3)}"


def deploy(
    store: FleetStore,
    *,
    release_id: str,
    group: str,
    spec: RolloutSpec,
    now: float,
    allow_unapproved: bool = False,
    rollout_id: str | None = None,
) -> Deployment:
    """Record a rollout of ``release_id`` to ``group``.

    Raises RolloutError: unknown release, a release not approved (unless ``allow_unapproved``) or rejected, an
    empty group, or no device of the release's profile in it. Raises ValueError for a bad group name."""
    validate_segment(group, "group")
    release = store.get_release(release_id)
    if release is None:
        known = ", ".join(r.release_id for r in store.list_releases()[:5]) or "none"
        raise RolloutError(f"unknown release {release_id!r} (known: {known}); publish it with `edgeops release "
                           f"publish` and let `edgeops fleet serve` register it")
    if release.approval is Approval.REJECTED:
        raise RolloutError(f"release {release_id} was rejected by {release.approved_by}")
    if release.approval is not Approval.APPROVED and not allow_unapproved:
        raise RolloutError(f"release {release_id} is pending approval: `edgeops releases approve {release_id}`")
    return _record(store, kind=RolloutKind.UPDATE, release_id=release_id, version=release.version,
                   profile=release.profile, group=group, spec=spec, now=now, rollout_id=rollout_id)


def rollback_group(store: FleetStore, *, group: str, now: float, timeout_s: float = 600.0) -> Deployment:
    """Send the devices of ``group`` that run the release of the group's latest update rollout back to their
    previous model (a rollout of kind ``rollback``), aborting that update rollout first.

    Raises RolloutError when the group never had an update rollout or none of its devices runs that release."""
    validate_segment(group, "group")
    updates = [r for r in store.list_rollouts(group=group) if r.kind is RolloutKind.UPDATE]
    if not updates:
        raise RolloutError(f"group {group} has had no rollout to roll back")
    last = updates[0]
    spec = RolloutSpec(phases=(1.0,), max_failures=1.0, timeout_s=timeout_s, continuous=False)
    return _record(store, kind=RolloutKind.ROLLBACK, release_id=last.release_id, version=last.version,
                   profile=last.profile, group=group, spec=spec, now=now, rollout_id=None)


def _record(
    store: FleetStore,
    *,
    kind: RolloutKind,
    release_id: str,
    version: str,
    profile: str,
    group: str,
    spec: RolloutSpec,
    now: float,
    rollout_id: str | None,
) -> Deployment:
    members = store.list_devices(group=group)
    plan = start_rollout(rollout_id=rollout_id or new_rollout_id(now), kind=kind, release_id=release_id,
                         version=version, profile=profile, group=group, spec=spec, devices=members, now=now)
    superseded = _supersede(store, group, plan.rollout.rollout_id, now)
    store.create_rollout(plan.rollout, plan.executions)
    skipped = tuple((e.device_id, e.reason) for e in plan.executions if e.device_id in set(plan.skipped))
    return Deployment(plan.rollout, len(plan.executions) - len(skipped), skipped, superseded)


def _supersede(store: FleetStore, group: str, new_id: str, now: float) -> tuple[str, ...]:
    active = [RolloutStatus.RUNNING, RolloutStatus.PAUSED, RolloutStatus.SUCCEEDED]
    older = store.list_rollouts(group=group, statuses=active)
    for r in older:
        store.save_rollout(replace(r, status=RolloutStatus.ABORTED, reason=f"superseded by {new_id}", updated_at=now))
    return tuple(r.rollout_id for r in older)


def _get(store: FleetStore, rollout_id: str) -> Rollout:
    rollout = store.get_rollout(rollout_id)
    if rollout is None:
        raise RolloutError(f"unknown rollout {rollout_id!r} (see `edgeops rollout list`)")
    return rollout


def _transition(store: FleetStore, rollout_id: str, allowed: Sequence[RolloutStatus], to: RolloutStatus,
                reason: str, now: float) -> Rollout:
    rollout = _get(store, rollout_id)
    if rollout.status not in allowed:
        raise RolloutError(f"rollout {rollout_id} is {rollout.status}: cannot set it {to}")
    updated = replace(rollout, status=to, reason=reason, updated_at=now)
    store.save_rollout(updated)
    return updated


def pause(store: FleetStore, rollout_id: str, *, now: float) -> Rollout:
    """Stop sending (outcomes are still recorded). Raises RolloutError unless the rollout is running."""
    return _transition(store, rollout_id, [RolloutStatus.RUNNING], RolloutStatus.PAUSED, "paused by operator", now)


def resume(store: FleetStore, rollout_id: str, *, now: float) -> Rollout:
    """Go on from where a paused rollout stopped. Raises RolloutError unless it is paused."""
    return _transition(store, rollout_id, [RolloutStatus.PAUSED], RolloutStatus.RUNNING, "resumed by operator", now)


def abort(store: FleetStore, rollout_id: str, *, now: float, reason: str = "aborted by operator") -> Rollout:
    """Stop a rollout for good (devices already updated stay updated: use rollback for that). Raises RolloutError
    when it is already failed or aborted."""
    allowed = [RolloutStatus.RUNNING, RolloutStatus.PAUSED, RolloutStatus.SUCCEEDED]
    return _transition(store, rollout_id, allowed, RolloutStatus.ABORTED, reason, now)
