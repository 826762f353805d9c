"""``edgeops delta make|apply|info``: model-aware binary deltas between two versions of a file (light: numpy and
zstandard only).

``make OLD NEW -o PATCH`` writes a patch (the codec that measured smallest), ``apply OLD PATCH -o NEW`` makes NEW
and checks its sha256 before it appears, ``info PATCH`` shows what a patch applies to and makes. Results go to
stdout (``--json`` for scripts). Exit status: 0 done; 1 an edgeops error (malformed patch, wrong base, hash
mismatch, cannot write); 2 a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from edgeops.delta import apply_delta, make_delta, read_patch_header
from edgeops.errors import EdgeopsError

__all__ = ["add_parser"]


def _level(text: str) -> int:
    try:
        level = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= level <= 22:
        raise argparse.ArgumentTypeError("zstd level must be 1..22")
    return level


def add_parser(sub: Any) -> None:
    p = sub.add_parser("delta", help="make, apply or inspect a model-aware delta patch")
    dsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    make = dsub.add_parser(
        "make",
        help="write a patch that turns OLD into NEW",
        description="Write a patch that turns OLD into NEW (artifacts, .tflite/.onnx models or any files). Tensors "
        "are aligned and diffed by byte plane where the files are models; the smallest codec measured is kept.",
    )
    make.add_argument("old", type=Path, metavar="OLD", help="the version devices have")
    make.add_argument("new", type=Path, metavar="NEW", help="the version to ship")
    make.add_argument("-o", "--output", type=Path, required=True, metavar="PATCH", help="where to write the patch")
    make.add_argument("--level", type=_level, default=19, metavar="N", help="zstd level 1..22 (default 19)")
    make.add_argument("--json", action="store_true", help="print the DeltaInfo as JSON")
    make.set_defaults(func=_make)

    apply = dsub.add_parser(
        "apply",
        help="make NEW from OLD and a patch",
        description="Make NEW from OLD and PATCH; NEW appears only when its sha256 is the one the patch announces.",
    )
    apply.add_argument("old", type=Path, metavar="OLD", help="the base the patch was made from")
    apply.add_argument("patch", type=Path, metavar="PATCH")
    apply.add_argument("-o", "--output", type=Path, required=True, metavar="NEW", help="where to write the result")
    apply.add_argument("--expect-sha256", metavar="HEX", help="also require NEW to have this sha256")
    apply.add_argument("--json", action="store_true", help="print the result as JSON")
    apply.set_defaults(func=_apply)

    info = dsub.add_parser("info", help="show what a patch applies to and makes")
    info.add_argument("patch", type=Path, metavar="PATCH")
    info.add_argument("--json", action="store_true", help="print the header as JSON")
    info.set_defaults(func=_info)


def _missing(*paths: Path) -> None:
    for path in paths:
        if not path.is_file():
            raise EdgeopsError(f"{path}: no such file")


def _make(args: argparse.Namespace) -> int:
    _missing(args.old, args.new)
    info = make_delta(args.old, args.new, args.output, level=args.level)
    if args.json:
        print(json.dumps(dataclasses.asdict(info), indent=1, sort_keys=True))
        return 0
    ratio = info.patch_size / info.new_size if info.new_size else 0.0
    aligned = info.aligned_bytes / info.new_size if info.new_size else 0.0
    tried = ", ".join(f"{name} {size}" for name, size in sorted(info.candidates.items(), key=lambda kv: kv[1]))
    print(f"wrote {args.output}: {info.patch_size} bytes, {ratio:.2%} of NEW ({info.new_size} bytes), {info.codec}")
    print(f"  tensors aligned: {aligned:.1%} of NEW; candidates: {tried}; {info.seconds:.2f} s")
    return 0


def _apply(args: argparse.Namespace) -> int:
    _missing(args.old, args.patch)
    sha = apply_delta(args.old, args.patch, args.output, expected_sha256=args.expect_sha256)
    size = args.output.stat().st_size
    if args.json:
        print(json.dumps({"output": str(args.output), "sha256": sha, "size": size}))
    else:
        print(f"wrote {args.output}: {size} bytes, sha256 {sha} (verified)")
    return 0


def _info(args: argparse.Namespace) -> int:
    _missing(args.patch)
    header = read_patch_header(args.patch)
    size = args.patch.stat().st_size
    if args.json:
        print(json.dumps({**dataclasses.asdict(header), "patch_size": size}, indent=1, sort_keys=True))
        return 0
    print(f"{args.patch}: {size} bytes, codec {header.codec}")
    print(f"  applies to sha256 {header.old_sha256} ({header.old_size} bytes)")
    print(f"  makes      sha256 {header.new_sha256} ({header.new_size} bytes)")
    return 0
