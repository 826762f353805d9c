"""The fleet's release registry: releases built into the release store (``edgeops release publish``) recorded in
the fleet store with their lineage (source model hash, data hashes, toolchain, gate figures) and an approval.

Guarantees: :func:`sync_releases` records every complete release of the fleet found in the release store whose
metadata verifies (against ``trusted`` keys, or the key its build recorded), never changes an existing release's
approval, and reports the ones it could not read instead of stopping at the first. It reads the lineage from the
target artifact's manifest without checking the artifact's signature again (the release metadata, which pins the
artifact's sha256, was verified). It does not publish anything on the broker (the release server does).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeops.errors import EdgeopsError
from edgeops.fleet.model import ReleaseRecord
from edgeops.fleet.store import FleetStore

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edgeops.release_builder import PublishedRelease

__all__ = ["SyncResult", "lineage_of", "record_of", "sync_releases"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncResult:
    releases: tuple[PublishedRelease, ...]  # every readable release of the fleet in the store, but those skipped
    added: tuple[str, ...]  # release ids recorded for the first time
    errors: tuple[str, ...]  # one line per release directory that could not be read


def lineage_of(target: Path) -> dict[str, Any]:
    """The lineage of an artifact from its manifest: source, data, toolchain, gate, precision, format, runtime.
    Returns {} when the file cannot be read (a release without a full payload)."""
    from edgeops.artifact import read_unverified_manifest

    try:
        m = read_unverified_manifest(target)
    except (OSError, EdgeopsError):
        return {}
    return {
        "source": m.source,
        "data": m.data,
        "toolchain": m.toolchain,
        "gate": m.gate,
        "format": m.format,
        "precision": m.precision,
        "runtime": m.runtime,
    }


def record_of(rel: PublishedRelease) -> ReleaseRecord:
    from edgeops.release_builder import TARGET_NAME

    meta = rel.meta
    payloads = tuple(
        {"id": p.id, "kind": p.kind.value, "base_version": p.base_version, "size": p.size, "codec": p.codec}
        for p in meta.payloads
    )
    return ReleaseRecord(
        release_id=meta.release_id,
        name=meta.name,
        version=meta.version,
        profile=meta.profile,
        created_at=meta.created_at,
        target_sha256=meta.target_sha256,
        size=meta.target_size,
        payloads=payloads,
        lineage=lineage_of(rel.directory / TARGET_NAME),
    )


def sync_releases(
    store: FleetStore,
    release_dir: Path,
    *,
    fleet: str,
    trusted: Sequence[Ed25519PublicKey] | None = None,
    skip: Collection[str] = (),
) -> SyncResult:
    """Record the releases of ``fleet`` in ``release_dir`` that the fleet store does not know yet. Release
    directories named in ``skip`` (release ids already read) are not read again.

    Raises StorageError when the fleet store is down."""
    from edgeops.release_builder import SIGNED_NAME, load_release

    found: list[PublishedRelease] = []
    errors: list[str] = []
    if release_dir.is_dir():
        for d in sorted(p for p in release_dir.iterdir() if p.name not in skip and (p / SIGNED_NAME).is_file()):
            try:
                found.append(load_release(d, trusted))
            except (OSError, EdgeopsError) as exc:
                errors.append(f"{d.name}: {exc}")
    mine = [r for r in found if r.meta.fleet == fleet]
    added = []
    for rel in mine:
        if store.get_release(rel.meta.release_id) is None:
            store.put_release(record_of(rel))
            added.append(rel.meta.release_id)
    return SyncResult(tuple(mine), tuple(added), tuple(errors))
