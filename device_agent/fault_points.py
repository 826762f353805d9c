"""Named crash points for fault-injection tests; inert in production.

``fault_point("stage.copied")`` does nothing unless the environment variable ``EDGEOPS_FAULT_POINT`` names that
point, in which case the process kills itself with SIGKILL on the spot — the closest a test can get to a power
cut at that line; ``NAME@N`` kills at the N-th time the point is reached (e.g. ``ota.chunk.stored@40``). The
variable is read once, at import; an unarmed point costs one comparison.

The points are grouped by the flow they interrupt (each tuple in the order the flow reaches them; the comment says
what is durable at that instant and what is not). tests/device_agent/test_crash_matrix.py kills the agent at every
one of them and checks what a user would notice after a restart; benchmarks/chaos/crash_matrix.py repeats that and
writes the outcomes; docs/agent.md lists them.
"""

from __future__ import annotations

import os
import signal

__all__ = [
    "INSTALL_POINTS",
    "OTA_POINTS",
    "POINTS",
    "SLOT_POINTS",
    "SPOOL_POINTS",
    "SWAP_POINTS",
    "TRUST_POINTS",
    "fault_point",
]

INSTALL_POINTS = (
    "stage.copied",  # the new artifact is in the temp file, fsynced, not yet verified
    "stage.verified",  # verified in the temp file, not yet renamed into the slot
    "stage.renamed",  # renamed into the candidate slot, state.json not yet updated
    "install.gated",  # health gate passed, state.json not yet committed
    "install.committed",  # state.json committed, the new model not yet serving
)
SLOT_POINTS = (
    "slot.state.replaced",  # a new state.json renamed into place and its directory synced; memory still the old one
)
SWAP_POINTS = (
    "install.swapped",  # the new model serving, its install.succeeded event not yet spooled
    "rollback.committed",  # state.json names the previous slot active, the rolled-away model still serving
    "rollback.swapped",  # the previous model serving, its rollback event not yet spooled
)
OTA_POINTS = (
    "ota.requested",  # ota-wanted.json written (the command is durable), release topics not yet subscribed
    "transfer.preallocated",  # metadata files and the preallocated part file synced in .new-*, not yet renamed
    "transfer.created",  # the transfer directory renamed into place and synced, no chunk written, not yet opened
    "transfer.chunk.written",  # a chunk's bytes written (not synced), its flag not yet written
    "ota.chunk.stored",  # a chunk written and flagged, not yet fsynced
    "transfer.synced",  # the part file and the flags fsynced (every sync_every_chunks chunks, and when complete)
    "ota.apply.started",  # the download is complete and synced, the delta not yet applied
    "ota.apply.record",  # one more delta op written to the target's temp file (not synced, not renamed)
    "ota.applied",  # the target artifact is built and its hash checked, not yet installed
    "ota.installed",  # the target installed and committed, the download and ota-wanted.json not yet removed
)
SPOOL_POINTS = (
    "spool.put.committed",  # a message committed to spool.sqlite (durable), the outbox not yet woken
    "outbox.published",  # a batch handed to the MQTT client, its PUBACKs not yet awaited
    "outbox.confirmed",  # the broker acknowledged the batch, its messages not yet deleted from the spool
    "spool.acked",  # the delivered messages' deletion committed, the in-memory count not yet updated
)
TRUST_POINTS = (
    "trust.root.written",  # root.json replaced (provisioning copy at the first start, or a followed rotation)
    "trust.timestamp.written",  # timestamp.json replaced; snapshot.json and targets.json not yet
    "trust.snapshot.written",  # snapshot.json replaced; targets.json not yet
    "trust.targets.written",  # targets.json replaced; the release not yet checked against it
)
POINTS = INSTALL_POINTS + SLOT_POINTS + SWAP_POINTS + OTA_POINTS + SPOOL_POINTS + TRUST_POINTS
_ARMED, _, _COUNT = (os.environ.get("EDGEOPS_FAULT_POINT") or "").partition("@")
_hits = {"n": 0}


def fault_point(name: str) -> None:
    """SIGKILL this process at the armed point (``EDGEOPS_FAULT_POINT``, set before start); otherwise nothing."""
    if not _ARMED or name != _ARMED:
        return
    _hits["n"] += 1
    if _hits["n"] >= (int(_COUNT) if _COUNT.isdigit() else 1):
        os.kill(os.getpid(), signal.SIGKILL)
