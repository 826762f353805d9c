"""Pass ``sign``: sign the manifest (Ed25519), pack the canonical artifact, check its size budget, write it.

This is the only pass that writes into the output folder, and it writes atomically, so a profile that failed
any earlier pass (or its size budget here) leaves no artifact behind.
"""

from __future__ import annotations

from dataclasses import dataclass

from converters.model_types import ModelState
from converters.pass_context import PassContext
from converters.registry import register
from edgeops.artifact import pack_artifact, sign_manifest
from edgeops.atomic_file import write_bytes_atomic
from edgeops.errors import GateFailure

__all__ = ["SignConfig", "artifact_name"]

MIB = 1024 * 1024


@dataclass(frozen=True)
class SignConfig:
    pass


def artifact_name(name: str, version: str, profile: str) -> str:
    return f"{name}-{version}-{profile}.edgeops"


@register("sign", SignConfig, "sign the manifest and write the artifact")
def run(ctx: PassContext, state: ModelState, cfg: SignConfig) -> ModelState:
    import zstandard

    o = ctx.outcome
    if o.manifest is None:
        raise RuntimeError("sign: package did not run")
    manifest = o.manifest.to_bytes()
    data = pack_artifact(manifest, sign_manifest(manifest, ctx.signing_key), o.files)
    limit = ctx.profile.budgets.artifact_size_mb
    if limit is not None and len(data) > limit * MIB:
        raise GateFailure(
            f"profile {ctx.profile.name}: artifact size {len(data) / MIB:.2f} MiB > budget {limit} MiB",
            profile=ctx.profile.name,
            figure="size_bytes",
        )
    o.size_bytes = len(data)
    o.size_zstd_bytes = len(zstandard.ZstdCompressor(level=10).compress(data))
    path = ctx.out_dir / artifact_name(ctx.name, ctx.version, ctx.profile.name)
    write_bytes_atomic(path, data)
    o.artifact = path
    return state
