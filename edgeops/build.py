"""``edgeops build``: run each profile's pass pipeline and collect the outcome (host side).

Order of checks, cheapest first, so that a bad invocation fails before minutes of conversion: version, signing
key, output folder, profiles, model, data. Then for each profile, in a private work folder: its passes in
order. A profile that raises a :class:`BuildError` is recorded as failed with a one-line reason and leaves no
artifact (only the ``sign`` pass writes into the output folder, atomically). Profiles are independent: one
failing does not stop the others.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from converters.model_types import ModelFormat, ModelState
from converters.pass_context import PassContext, ProfileOutcome
from converters.registry import get_pass, make_config
from converters.sign import artifact_name
from converters.source_model import SourceModel, load_source, resolve_shapes
from edgeops.datasets import Dataset, load_dataset
from edgeops.errors import BuildError, DataError, EdgeopsError, OutputError
from edgeops.manifest import parse_semver
from edgeops.profiles import Profile, load_profile
from edgeops.runtime import RuntimeUnavailable
from edgeops.signing import load_private_key

__all__ = ["BuildRequest", "ProfileResult", "run_build"]

Progress = Callable[[str, str, int], None]
"""progress(profile, step, steps) is called before each step; ``steps`` is the profile's pass count."""


@dataclass(frozen=True)
class BuildRequest:
    model: Path
    profiles: Sequence[str]
    key: Path
    version: str
    out_dir: Path
    calib: Path | None = None
    eval: Path | None = None
    train: Path | None = None
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    profiles_dirs: Sequence[Path] = ()
    name: str | None = None


@dataclass
class ProfileResult:
    profile: Profile
    outcome: ProfileOutcome
    passed: bool
    reason: str | None
    seconds: float


def _check_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OutputError(f"output folder {out_dir} is not writable: {exc.strerror}") from None


@dataclass
class _Inputs:
    source: SourceModel
    shapes: dict[str, tuple[int, ...]]
    calib: Dataset | None
    eval: Dataset
    train: Dataset | None
    reference: dict[str, np.ndarray]


def _load_inputs(req: BuildRequest) -> _Inputs:
    source = load_source(req.model)
    calib = load_dataset(req.calib, source.inputs, role="calibration") if req.calib else None
    evaluation = load_dataset(req.eval, source.inputs, role="eval") if req.eval else calib
    if evaluation is None:
        raise DataError("no data to validate with: give --calib and/or --eval")
    train = load_dataset(req.train, source.inputs, role="train") if req.train else None
    shapes = resolve_shapes(source.inputs, req.input_shapes, calib.feeds if calib else evaluation.feeds)
    reference = source.run(evaluation.feeds)
    return _Inputs(source, shapes, calib, evaluation, train, dict(reference))


def _run_profile(
    req: BuildRequest, profile: Profile, inputs: _Inputs, key: Ed25519PrivateKey, progress: Progress
) -> ProfileResult:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"edgeops-{profile.name}-") as work:
        ctx = PassContext(
            profile=profile,
            source=inputs.source,
            input_shapes=inputs.shapes,
            calib=inputs.calib,
            eval=inputs.eval,
            train=inputs.train,
            reference=inputs.reference,
            workdir=Path(work),
            out_dir=req.out_dir,
            name=req.name or inputs.source.name,
            version=req.version,
            signing_key=key,
        )
        state = ModelState(fmt=ModelFormat(inputs.source.fmt), path=inputs.source.path)
        try:
            for name in profile.passes:
                progress(profile.name, name, len(profile.passes))
                started = time.perf_counter()
                state = get_pass(name).run(ctx, state, make_config(name, profile.pass_options.get(name, {})))
                ctx.outcome.pass_seconds[name] = round(time.perf_counter() - started, 3)
        except RuntimeUnavailable as exc:
            return ProfileResult(
                profile, ctx.outcome, False, f"profile {profile.name}: {exc}", time.perf_counter() - t0
            )
        except BuildError as exc:
            reason = str(exc) if str(exc).startswith("profile ") else f"profile {profile.name}: {exc}"
            return ProfileResult(profile, ctx.outcome, False, reason, time.perf_counter() - t0)
        ctx.outcome.notes[:0] = [n for n in state.notes if n not in ctx.outcome.notes]
        return ProfileResult(profile, ctx.outcome, True, None, time.perf_counter() - t0)


def run_build(
    req: BuildRequest, progress: Progress = lambda profile, step, steps: None
) -> tuple[_Inputs, list[ProfileResult]]:
    """Build every requested profile. Raises EdgeopsError for problems common to all profiles."""
    try:
        parse_semver(req.version)
    except ValueError as exc:
        raise BuildError(str(exc)) from None
    key = load_private_key(req.key)
    _check_out_dir(req.out_dir)
    profiles = [load_profile(p, req.profiles_dirs) for p in dict.fromkeys(req.profiles)]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    progress("", "load", 1)
    inputs = _load_inputs(req)
    results = []
    for profile in profiles:
        try:
            result = _run_profile(req, profile, inputs, key, progress)
        except EdgeopsError as exc:  # a non-build error inside one profile (e.g. output folder vanished)
            result = ProfileResult(profile, ProfileOutcome(), False, f"profile {profile.name}: {exc}", 0.0)
        if not result.passed:  # never leave an older artifact of the same name where this build failed
            stale = req.out_dir / artifact_name(req.name or inputs.source.name, req.version, profile.name)
            stale.unlink(missing_ok=True)
        results.append(result)
    return inputs, results
