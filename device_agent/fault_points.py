"""Named crash points for fault-injection tests; inert in production.

``fault_point("stage.copied")`` does nothing unless the environment variable ``EDGEOPS_FAULT_POINT`` names that
point, in which case the process kills itself with SIGKILL on the spot — the closest a test can get to a power
cut at that line; ``NAME@N`` kills at the N-th time the point is reached (e.g. ``ota.chunk.stored@40``).
tests/device_agent/test_crash_points.py drives the install points, test_ota_e2e.py the OTA ones; docs/agent.md
lists them.
"""

from __future__ import annotations

import os
import signal

__all__ = ["INSTALL_POINTS", "OTA_POINTS", "POINTS", "fault_point"]

INSTALL_POINTS = (
    "stage.copied",  # the new artifact is in the temp file, fsynced, not yet verified
    "stage.verified",  # verified in the temp file, not yet renamed into the slot
    "stage.renamed",  # renamed into the candidate slot, state.json not yet updated
    "install.gated",  # health gate passed, state.json not yet committed
    "install.committed",  # state.json committed, the new model not yet serving
)
OTA_POINTS = (
    "ota.chunk.stored",  # a chunk written and flagged, not yet fsynced
    "ota.apply.started",  # the download is complete and synced, the delta not yet applied
    "ota.applied",  # the target artifact is built and its hash checked, not yet installed
)
POINTS = INSTALL_POINTS + OTA_POINTS
_ARMED, _, _COUNT = (os.environ.get("EDGEOPS_FAULT_POINT") or "").partition("@")
_hits = {"n": 0}


def fault_point(name: str) -> None:
    """SIGKILL this process at the armed point (``EDGEOPS_FAULT_POINT``, set before start); otherwise nothing."""
    if not _ARMED or name != _ARMED:
        return
    _hits["n"] += 1
    if _hits["n"] >= (int(_COUNT) if _COUNT.isdigit() else 1):
        os.kill(os.getpid(), signal.SIGKILL)
