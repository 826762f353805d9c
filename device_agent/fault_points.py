"""Named crash points for fault-injection tests; inert in production.

``fault_point("stage.copied")`` does nothing unless the environment variable ``EDGEOPS_FAULT_POINT`` names that
point, in which case the process kills itself with SIGKILL on the spot — the closest a test can get to a power
cut at that line. tests/device_agent/test_crash_points.py drives every point; docs/agent.md lists them.
"""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "fault_point"]

POINTS = (
    "stage.copied",  # the new artifact is in the temp file, fsynced, not yet verified
    "stage.verified",  # verified in the temp file, not yet renamed into the slot
    "stage.renamed",  # renamed into the candidate slot, state.json not yet updated
    "install.gated",  # health gate passed, state.json not yet committed
    "install.committed",  # state.json committed, the new model not yet serving
)
_ARMED = os.environ.get("EDGEOPS_FAULT_POINT")


def fault_point(name: str) -> None:
    """SIGKILL this process when ``EDGEOPS_FAULT_POINT == name`` (set before start); otherwise nothing."""
    if _ARMED is not None and name == _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
