"""A real InferenceService for front-end tests: the digits CNN (float32 NCHW (N, 1, 8, 8) → "probs") in
onnxruntime, without the agent's slots and model host, so API and batch tests exercise only the front end."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.service import InferenceResult, NoModelError
from edgeops.errors import RequestError
from edgeops.manifest import TensorInfo
from edgeops.runtime import ModelRunner, open_model


class DigitsService:
    """``model=None``: no model installed (503). ``with_label``: also answers "label" (a two-output model)."""

    def __init__(self, model: Path | None, *, version: str = "1.0.0", with_label: bool = False) -> None:
        self.runner = ModelRunner(open_model(model, "onnx")) if model is not None else None
        self.version = version
        self.with_label = with_label
        self.requests = 0

    def input_schema(self) -> list[TensorInfo] | None:
        if self.runner is None:
            return None
        return [TensorInfo("image", [-1, 1, 8, 8], "float32", "float32", layout="NCHW")]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> InferenceResult:
        if self.runner is None:
            raise NoModelError("no model is installed yet")
        if set(feeds) != {"image"}:
            raise RequestError(f"unknown inputs {sorted(feeds)}: the model takes 'image'")
        x = feeds["image"]
        if x.ndim != 4 or x.shape[1:] != (1, 8, 8):
            raise RequestError(f"input 'image' has shape {x.shape}, expected (N, 1, 8, 8)")
        start = time.perf_counter()
        outputs = self.runner.run({"image": x.astype(np.float32)})
        if self.with_label:
            outputs["label"] = np.argmax(outputs["probs"], axis=1).astype(np.float32)
        self.requests += 1
        return InferenceResult(outputs, self.version, (time.perf_counter() - start) * 1000)

    def status(self) -> dict[str, Any]:
        return {"active": {"version": self.version if self.runner else None}, "requests": self.requests}
