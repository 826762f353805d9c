"""What the inference front ends (HTTP API, batch folder, ``infer``) need from the model host.

:class:`InferenceService` is the seam between the adapters that receive requests and
:class:`device_agent.model_host.ModelHost`, which owns the loaded models. Front ends decode bytes into arrays
(size limits, JSON / ``.npy`` parsing) and leave every model-specific check to the service.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgeops.errors import EdgeopsError
from edgeops.manifest import TensorInfo

__all__ = ["InferenceResult", "InferenceService", "NoModelError"]


class NoModelError(EdgeopsError):
    """No model is installed or loaded yet; the API answers 503."""


@dataclass(frozen=True)
class InferenceResult:
    outputs: dict[str, np.ndarray]  # float outputs by name, batch-first
    version: str  # the model version that produced them (the fallback's when it answered)
    latency_ms: float  # time in the runtime, pre/post-processing included


class InferenceService(Protocol):
    def infer(self, feeds: Mapping[str, np.ndarray]) -> InferenceResult:
        """Run one request (raw caller inputs by name, batch-first).

        Raises RequestError (bad names/shape/dtype), NoModelError, or EdgeopsError when the runtime fails.
        """
        ...

    def input_schema(self) -> list[TensorInfo] | None:
        """The active model's inputs as callers send them; None when no model is loaded."""
        ...

    def status(self) -> dict[str, Any]:
        """JSON-ready status: active/previous/shadow versions, health, counters."""
        ...
