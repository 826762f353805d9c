"""``edgeops build``: convert, optimise, validate and sign a model for one or more hardware profiles."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "parse_input_shape"]


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``NAME=1,3,48,192`` → ("NAME", (1, 3, 48, 192))."""
    name, sep, dims = text.partition("=")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"expected NAME=D1,D2,... with positive dims, got {text!r}")
    return name, shape


def add_parser(sub: Any) -> None:
    from edgeops.cli.main import profiles_dirs_arg

    p = sub.add_parser(
        "build",
        help="build signed, validated artifacts for hardware profiles",
        description="Convert MODEL (.keras, SavedModel dir, .onnx) for each --profile, quantize, "
        "validate against the source with the real runtime, benchmark, and write one "
        "signed artifact per profile plus report.json/report.html into --out.",
    )
    p.add_argument("model", type=Path, help=".keras file, SavedModel directory or .onnx file")
    p.add_argument("--profile", action="append", required=True, help="hardware profile (repeatable)")
    p.add_argument("--calib", type=Path, help="calibration DATA (.npz/.npy/image folder); needed for int8")
    p.add_argument("--eval", type=Path, help="evaluation DATA with optional labels y (default: --calib)")
    p.add_argument("--train", type=Path, help="training DATA (x, y) for the prune pass's fine-tune")
    p.add_argument("--key", type=Path, required=True, help="Ed25519 signing key (edgeops keys init)")
    p.add_argument("--version", required=True, help="semantic version of this model release")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--name", help="artifact name (default: the model file's name)")
    p.add_argument(
        "--input-shape",
        type=parse_input_shape,
        action="append",
        default=[],
        metavar="NAME=D1,D2,..",
        help="fix an input's dynamic dims (repeatable); default: the calibration data's shape",
    )
    p.add_argument("--json", action="store_true", help="print report.json to stdout")
    profiles_dirs_arg(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgeops.build import BuildRequest, run_build
    from edgeops.report import build_report, write_report

    req = BuildRequest(
        model=args.model,
        profiles=args.profile,
        key=args.key,
        version=args.version,
        out_dir=args.out,
        calib=args.calib,
        eval=args.eval,
        train=args.train,
        input_shapes=dict(args.input_shape),
        profiles_dirs=args.profiles_dir,
        name=args.name,
    )
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[step]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, Any] = {}

        def progress(profile: str, step: str, steps: int) -> None:
            key = profile or "(inputs)"
            if key not in tasks:
                for t in tasks.values():
                    bar.update(t, completed=bar.tasks[t].total, step="done")
                tasks[key] = bar.add_task(key, total=steps, step=step)
            else:
                bar.update(tasks[key], advance=1, step=step)

        inputs, results = run_build(req, progress)
        for t in tasks.values():
            bar.update(t, completed=bar.tasks[t].total, step="done")
    report = build_report(args.model, args.version, _size(args.model), inputs.source.sha256, results)
    json_path, html_path = write_report(args.out, report)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
    for r in results:
        if r.passed:
            console.print(f"[green]ok[/] {r.profile.name}: {r.outcome.artifact}")
    for r in results:
        if not r.passed:
            print(f"edgeops: FAILED {r.reason}", file=sys.stderr)
    console.print(f"report: {json_path} and {html_path}")
    return 0 if report["passed"] else 1


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
