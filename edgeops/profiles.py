"""Hardware profiles: TOML files that say what to build for a device class (data, not code).

Search order for a profile NAME (later wins): the built-in ``hw_profiles/`` directory, each directory in the
``EDGEOPS_PROFILES_DIR`` environment variable (``os.pathsep``-separated), then each ``--profiles-dir``. A file
``NAME.toml`` defines profile NAME. :func:`load_profile` validates every field and every pass option against
the pass registry and raises :class:`ProfileError` naming the file and the field. docs/profiles.md documents
the schema.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeops.errors import ProfileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Budgets", "Profile", "builtin_profiles_dir", "list_profiles", "load_profile", "profile_dirs"]

ENV_VAR = "EDGEOPS_PROFILES_DIR"
FORMATS = {"tflite": "litert", "onnx": "onnxruntime", "coreml": "coreml"}
PRECISIONS = {
    "tflite": ("fp32", "fp16", "int8-dynamic", "int8"),
    "onnx": ("fp32", "fp16", "int8-dynamic", "int8"),
    "coreml": ("fp16", "int8-weights"),
}


@dataclass(frozen=True)
class Budgets:
    max_accuracy_drop_pt: float = 1.0  # percentage points of top-1 accuracy vs the source model
    min_agreement: float = 0.99  # fraction of samples whose top-1 equals the source model's
    max_abs_err: float | None = None  # largest |artifact - source| over all outputs, when set
    artifact_size_mb: float | None = None  # MiB; the build fails past it
    memory_mb: float | None = None  # MiB of device RAM for the model; reported
    latency_p95_ms: float | None = None  # on the device; the host figure is reported, the agent enforces it


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    format: str  # tflite / onnx / coreml
    runtime: str  # litert / onnxruntime / coreml
    precision: str
    threads: int
    delegates: tuple[str, ...]  # LiteRT delegates on the device (xnnpack, gpu, nnapi, edgetpu)
    execution_providers: tuple[str, ...]  # onnxruntime providers, in order of preference
    budgets: Budgets
    passes: tuple[str, ...]
    pass_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        d["pass_options"] = {k: dict(v) for k, v in self.pass_options.items()}
        return d


def builtin_profiles_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "hw_profiles"


def profile_dirs(extra: Sequence[Path] = ()) -> list[Path]:
    """The directories searched, lowest priority first."""
    env = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    return [builtin_profiles_dir(), *env, *extra]


def _find(name: str, extra: Sequence[Path]) -> Path:
    for directory in reversed(profile_dirs(extra)):
        candidate = directory / f"{name}.toml"
        if candidate.is_file():
            return candidate
    raise ProfileError(f"unknown profile {name!r} (known: {', '.join(list_profiles(extra)) or 'none'})")


def list_profiles(extra: Sequence[Path] = ()) -> list[str]:
    names: set[str] = set()
    for directory in profile_dirs(extra):
        if directory.is_dir():
            names.update(p.stem for p in directory.glob("*.toml"))
    return sorted(names)


def _get(doc: Mapping[str, Any], key: str, kind: type, where: str, default: Any = ...) -> Any:
    if key not in doc:
        if default is ...:
            raise ProfileError(f"{where}: missing field {key!r}")
        return default
    value = doc[key]
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ProfileError(f"{where}: field {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _budgets(doc: Mapping[str, Any], where: str) -> Budgets:
    known = set(Budgets.__dataclass_fields__)
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ProfileError(f"{where}: unknown budget(s) {unknown} (known: {sorted(known)})")
    return Budgets(**{k: float(_get(doc, k, float, where)) for k in doc})


def _validate_passes(passes: Sequence[str], options: Mapping[str, Any], where: str) -> None:
    from converters.registry import PASS_ORDER, REQUIRED_PASSES, make_config

    for p in passes:
        if p not in PASS_ORDER:
            raise ProfileError(f"{where}: unknown pass {p!r} (known: {', '.join(PASS_ORDER)})")
    order = [PASS_ORDER.index(p) for p in passes]
    if order != sorted(set(order)):
        raise ProfileError(f"{where}: passes must run once each in the order {', '.join(PASS_ORDER)}")
    missing = [p for p in REQUIRED_PASSES if p not in passes]
    if missing:
        raise ProfileError(f"{where}: pipeline lacks required pass(es) {missing}")
    for name, opts in options.items():
        if name not in passes:
            raise ProfileError(f"{where}: options given for pass {name!r} that is not in the pipeline")
        try:
            make_config(name, opts)
        except ProfileError as exc:
            raise ProfileError(f"{where}: {exc}") from None


def parse_profile(doc: Mapping[str, Any], path: Path) -> Profile:
    """Validate a parsed TOML document as a profile. Raises ProfileError naming ``path`` and the field."""
    where = str(path)
    fmt = _get(doc, "format", str, where)
    if fmt not in FORMATS:
        raise ProfileError(f"{where}: format must be one of {sorted(FORMATS)}, got {fmt!r}")
    precision = _get(doc, "precision", str, where)
    if precision not in PRECISIONS[fmt]:
        raise ProfileError(f"{where}: precision {precision!r} is not available for {fmt} ({PRECISIONS[fmt]})")
    runtime = _get(doc, "runtime", str, where, FORMATS[fmt])
    if runtime != FORMATS[fmt]:
        raise ProfileError(f"{where}: runtime for {fmt} is {FORMATS[fmt]!r}, got {runtime!r}")
    threads = _get(doc, "threads", int, where, 1)
    if threads < 1:
        raise ProfileError(f"{where}: threads must be >= 1")
    passes = tuple(_get(doc, "passes", list, where))
    options = _get(doc, "pass_options", dict, where, {})
    _validate_passes(passes, options, where)
    name = _get(doc, "name", str, where, path.stem)
    if name != path.stem:
        raise ProfileError(f"{where}: name {name!r} must match the file name {path.stem!r}")
    return Profile(
        name=name,
        description=_get(doc, "description", str, where, ""),
        format=fmt,
        runtime=runtime,
        precision=precision,
        threads=threads,
        delegates=tuple(_get(doc, "delegates", list, where, [])),
        execution_providers=tuple(_get(doc, "execution_providers", list, where, ["CPUExecutionProvider"])),
        budgets=_budgets(_get(doc, "budgets", dict, where, {}), where),
        passes=passes,
        pass_options={k: dict(v) for k, v in options.items()},
        path=path,
    )


def load_profile(name: str, extra_dirs: Sequence[Path] = ()) -> Profile:
    """Find and validate profile ``name``. Raises ProfileError when unknown or invalid."""
    path = _find(name, extra_dirs)
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: invalid TOML: {exc}") from None
    return parse_profile(doc, path)
