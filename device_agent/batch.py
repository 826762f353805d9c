"""Batch-folder mode: every ``*.npy`` input in a folder → its result next to it (``edgeops-agent batch``).

Guarantees:

- Inputs are taken in sorted name order; ``*.out.npy`` files (results) are never taken as inputs.
- ``x.npy`` → ``x.out.npy`` for a one-output model, ``x.out.npz`` (one array per output name) otherwise. Each
  result is written atomically (temp file, fsync, rename), so a crash leaves no half-written result and a
  re-run redoes exactly the inputs without one.
- A bad input (not an ``.npy``, wrong shape or dtype, a runtime failure on it) is recorded in
  :attr:`BatchSummary.failed` with the reason and the run goes on; only an unusable folder (missing, not
  readable, not writable) or no model at all stops it.

Not done here: decoding checks beyond ``np.load(allow_pickle=False)`` (the files are the operator's own),
or any model-specific check (the service's job).
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_agent.service import InferenceService, NoModelError
from edgeops.atomic_file import write_bytes_atomic
from edgeops.errors import EdgeopsError, OutputError, StorageError
from edgeops.manifest import TensorInfo

__all__ = ["BatchSummary", "result_paths", "run_batch"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchSummary:
    done: int  # inputs run and their results written
    skipped: int  # inputs whose result already existed (overwrite=False)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input file name, reason)


def result_paths(source: Path) -> tuple[Path, Path]:
    """The two possible result files of an input: ``<stem>.out.npy`` and ``<stem>.out.npz``."""
    return source.with_name(f"{source.stem}.out.npy"), source.with_name(f"{source.stem}.out.npz")


def _inputs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise NotADirectoryError(f"batch folder {folder} is not a directory")
    return sorted(p for p in folder.glob("*.npy") if not p.name.endswith(".out.npy") and p.is_file())


def _load(path: Path) -> np.ndarray:
    """The array in an ``.npy`` file. Raises ValueError naming the problem."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"not a readable .npy file: {exc}") from None
    if not isinstance(loaded, np.ndarray):
        loaded.close()
        raise ValueError("not a single-array .npy file (an .npz archive?)")
    return loaded


def _encode(outputs: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    if len(outputs) == 1:
        np.save(buf, np.asarray(next(iter(outputs.values()))), allow_pickle=False)
        return buf.getvalue()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, arr in outputs.items():
            member = io.BytesIO()
            np.save(member, np.asarray(arr), allow_pickle=False)
            archive.writestr(f"{name}.npy", member.getvalue())
    return buf.getvalue()


def _input_name(schema: list[TensorInfo] | None) -> str:
    return schema[0].name if schema is not None and len(schema) == 1 else "input"


def _run_one(source: Path, service: InferenceService, overwrite: bool) -> None:
    """Run one input and write its result. Raises ValueError/EdgeopsError for this input, StorageError for
    the folder, NoModelError when no model is loaded."""
    x = _load(source)
    result = service.infer({_input_name(service.input_schema()): x})
    if not result.outputs:
        raise ValueError("the model returned no outputs")
    out_npy, out_npz = result_paths(source)
    target, other = (out_npy, out_npz) if len(result.outputs) == 1 else (out_npz, out_npy)
    try:
        write_bytes_atomic(target, _encode(result.outputs))
        if overwrite:
            other.unlink(missing_ok=True)  # a stale result of a model with another number of outputs
    except (OutputError, OSError) as exc:
        raise StorageError(f"cannot write results in {source.parent}: {exc}") from exc


def run_batch(
    folder: Path,
    service: InferenceService,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> BatchSummary:
    """Run every input in ``folder``; ``progress(handled, total)`` after each one.

    Raises OSError when the folder is missing or cannot be listed, StorageError when a result cannot be
    written there, NoModelError when no model is loaded. Problems with one input are in ``failed``.
    """
    inputs = _inputs(folder)
    done = skipped = 0
    failed: list[tuple[str, str]] = []
    for i, source in enumerate(inputs, start=1):
        if not overwrite and any(p.exists() for p in result_paths(source)):
            skipped += 1
        else:
            try:
                _run_one(source, service, overwrite)
                done += 1
            except (StorageError, NoModelError):
                raise
            except (ValueError, EdgeopsError) as exc:
                log.warning("batch: %s failed: %s", source.name, exc)
                failed.append((source.name, str(exc)))
        if progress is not None:
            progress(i, len(inputs))
    return BatchSummary(done=done, skipped=skipped, failed=failed)
