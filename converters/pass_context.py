"""What every pass of one profile's build can see (:class:`PassContext`) and fill in (:class:`ProfileOutcome`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from converters.source_model import SourceModel
    from edgeops.datasets import Dataset
    from edgeops.manifest import Manifest
    from edgeops.profiles import Profile

__all__ = ["PassContext", "ProfileOutcome"]


@dataclass
class ProfileOutcome:
    """The figures one profile's passes produce; the report is written from it."""

    metrics: dict[str, float | None] = field(default_factory=dict)  # agreement, accuracy, source_accuracy, max_abs_err
    latency_ms: dict[str, float] | None = None  # p50, p95, mean on this host
    executed: bool = False  # the artifact really ran in its runtime here
    providers_used: tuple[str, ...] = ()
    sparsity: float | None = None
    notes: list[str] = field(default_factory=list)
    golden_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    golden_outputs: dict[str, np.ndarray] = field(default_factory=dict)
    golden_tolerance: tuple[float, float] = (1e-4, 1e-3)  # atol, rtol
    drift: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # artifact members besides manifest/signature
    manifest: Manifest | None = None
    artifact: Path | None = None
    size_bytes: int | None = None
    size_zstd_bytes: int | None = None
    model_size_bytes: int | None = None
    pass_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class PassContext:
    profile: Profile
    source: SourceModel
    input_shapes: dict[str, tuple[int, ...]]  # static shapes of the source inputs (source layout, batch 1)
    calib: Dataset | None
    eval: Dataset
    train: Dataset | None
    reference: dict[str, np.ndarray]  # the source model's outputs on eval.feeds
    workdir: Path
    out_dir: Path
    name: str
    version: str
    signing_key: Ed25519PrivateKey
    outcome: ProfileOutcome = field(default_factory=ProfileOutcome)

    @property
    def host_threads(self) -> int:
        """The profile's thread count, capped at this host's cores."""
        return max(1, min(self.profile.threads, os.cpu_count() or 1))
