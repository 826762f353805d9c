"""The artifact manifest: what a model is, how to feed it, and how to check it (light core).

The manifest is JSON with sorted keys, so the same build gives the same bytes; those bytes are what is signed.
``Manifest.from_bytes`` checks the fields the device relies on (types, required keys, semver, file names and
hashes) and raises :class:`ArtifactFormatError` otherwise; sections only the host reads (``toolchain``,
``recipe``, ``gate``, ``drift``) are kept as JSON objects. See docs/artifact.md for every field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from edgeops import bounded_json
from edgeops.errors import ArtifactFormatError

__all__ = ["MANIFEST_SCHEMA", "FileEntry", "Golden", "Manifest", "TensorInfo", "parse_semver"]

MANIFEST_SCHEMA = 1
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_SEMVER = re.compile(
    r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+[0-9A-Za-z.-]+)?"
)  # ASCII digits only, matched in full (no trailing newline)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def parse_semver(version: str) -> tuple[Any, ...]:
    """A sort key for a semantic version (a pre-release sorts before its release). Raises ValueError."""
    m = _SEMVER.fullmatch(version) if isinstance(version, str) else None
    if not m:
        raise ValueError(f"not a semantic version (MAJOR.MINOR.PATCH): {version!r}")
    pre = m.group(4).split(".") if m.group(4) else []
    pre_key = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre)
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), 0 if pre else 1, pre_key


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output as the caller sees it (after ``transpose`` for inputs)."""

    name: str
    shape: list[int]  # the shape callers send/receive, batch first; -1 for a dynamic dim
    dtype: str  # the dtype callers send/receive (float32 unless the model takes raw integers)
    model_dtype: str  # the dtype inside the model (int8 for a full-integer model)
    layout: str | None = None  # layout of the caller's data ("NCHW"/"NHWC") for 4-D images
    scale: float | None = None  # quantisation of the model tensor: real = scale * (q - zero_point)
    zero_point: int | None = None
    transpose: list[int] | None = None  # permutation applied to the caller's array before the model


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Golden:
    """Golden pairs for the device's health gate: ``.npy`` files inside the artifact, batch-first."""

    inputs: dict[str, str]  # input name -> member path
    outputs: dict[str, str]  # output name -> member path
    count: int
    atol: float
    rtol: float


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    profile: str
    format: str  # tflite / onnx / coreml
    precision: str
    runtime: str  # litert / onnxruntime / coreml
    model_file: str  # member path of the model (a directory prefix for .mlpackage)
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    files: list[FileEntry]
    source: dict[str, Any]  # {"file", "format", "sha256"}
    data: dict[str, Any]  # {"calib_sha256", "eval_sha256", "train_sha256"}
    toolchain: dict[str, str]
    runtime_config: dict[str, Any]  # {"threads", "delegates", "execution_providers"}
    recipe: dict[str, Any]  # the resolved profile and pass configs
    gate: dict[str, Any]  # metrics and budgets the build gate saw
    golden: Golden | None
    drift: dict[str, Any] = field(default_factory=dict)  # reference histograms {"inputs": {...}, "outputs": {...}}
    schema: int = MANIFEST_SCHEMA

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        """Parse and check a manifest. Raises ArtifactFormatError naming the first bad field."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ArtifactFormatError("manifest too large")
        try:
            doc = bounded_json.loads(raw)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise ArtifactFormatError("manifest is not valid JSON") from None
        if not isinstance(doc, dict):
            raise ArtifactFormatError("manifest is not a JSON object")
        return _manifest_from_dict(doc)


def _req(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ArtifactFormatError(f"manifest field {key!r} is missing or has the wrong type")
    return value


def _tensor(doc: Any) -> TensorInfo:
    if not isinstance(doc, dict):
        raise ArtifactFormatError("manifest tensor entry is not an object")
    shape = _req(doc, "shape", list)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ArtifactFormatError("manifest tensor shape must be integers")
    transpose = doc.get("transpose")
    if transpose is not None and (
        not isinstance(transpose, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in transpose)
        or sorted(transpose) != list(range(len(shape)))
    ):
        raise ArtifactFormatError("manifest tensor transpose is not a permutation of its dims")
    return TensorInfo(
        name=_req(doc, "name", str),
        shape=shape,
        dtype=_req(doc, "dtype", str),
        model_dtype=_req(doc, "model_dtype", str),
        layout=doc.get("layout"),
        scale=doc.get("scale"),
        zero_point=doc.get("zero_point"),
        transpose=transpose,
    )


def _file(doc: Any) -> FileEntry:
    if not isinstance(doc, dict):
        raise ArtifactFormatError("manifest file entry is not an object")
    entry = FileEntry(path=_req(doc, "path", str), sha256=_req(doc, "sha256", str), size=_req(doc, "size", int))
    if not _SHA256.fullmatch(entry.sha256) or entry.size < 0:
        raise ArtifactFormatError(f"manifest file entry for {entry.path!r} is malformed")
    return entry


def _golden(doc: Any) -> Golden | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise ArtifactFormatError("manifest golden section is not an object")
    return Golden(
        inputs=_req(doc, "inputs", dict),
        outputs=_req(doc, "outputs", dict),
        count=_req(doc, "count", int),
        atol=_tolerance(doc, "atol"),
        rtol=_tolerance(doc, "rtol"),
    )


def _tolerance(doc: dict[str, Any], key: str) -> float:
    value = _req(doc, key, (int, float))
    try:
        tol = float(value)
    except OverflowError:
        raise ArtifactFormatError(f"manifest golden {key} is out of range") from None
    if not math.isfinite(tol) or tol < 0:
        raise ArtifactFormatError(f"manifest golden {key} must be a finite number >= 0")
    return tol


def _manifest_from_dict(doc: Mapping[str, Any]) -> Manifest:
    if doc.get("schema") != MANIFEST_SCHEMA:
        raise ArtifactFormatError(f"unsupported manifest schema {doc.get('schema')!r}")
    version = _req(doc, "version", str)
    try:
        parse_semver(version)
    except ValueError as exc:
        raise ArtifactFormatError(str(exc)) from None
    files = [_file(f) for f in _req(doc, "files", list)]
    if len({f.path for f in files}) != len(files):
        raise ArtifactFormatError("manifest lists a file twice")
    return Manifest(
        name=_req(doc, "name", str),
        version=version,
        profile=_req(doc, "profile", str),
        format=_req(doc, "format", str),
        precision=_req(doc, "precision", str),
        runtime=_req(doc, "runtime", str),
        model_file=_req(doc, "model_file", str),
        inputs=[_tensor(t) for t in _req(doc, "inputs", list)],
        outputs=[_tensor(t) for t in _req(doc, "outputs", list)],
        files=files,
        source=_req(doc, "source", dict),
        data=_req(doc, "data", dict),
        toolchain=_req(doc, "toolchain", dict),
        runtime_config=_req(doc, "runtime_config", dict),
        recipe=_req(doc, "recipe", dict),
        gate=_req(doc, "gate", dict),
        golden=_golden(doc.get("golden")),
        drift=_req(doc, "drift", dict),
    )
