"""The build report: ``report.json`` (the contract in DESIGN.md) and a self-contained ``report.html``.

The HTML has no external resource: inline CSS and inline SVG bar charts of size, host latency and accuracy per
profile, so it opens offline and can be attached to a CI run.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeops.atomic_file import write_bytes_atomic

__all__ = ["REPORT_SCHEMA", "build_report", "render_html", "write_report"]

REPORT_SCHEMA = 1


def _entry(result: Any, source_size: int) -> dict[str, Any]:
    o, p = result.outcome, result.profile
    m = o.metrics or {}
    return {
        "profile": p.name,
        "artifact": str(o.artifact) if o.artifact else None,
        "format": p.format,
        "runtime": p.runtime,
        "precision": p.precision,
        "size_bytes": o.size_bytes,
        "size_zstd_bytes": o.size_zstd_bytes,
        "model_size_bytes": o.model_size_bytes,
        "source_size_bytes": source_size,
        "sparsity": o.sparsity,
        "metrics": {k: m.get(k) for k in ("agreement", "accuracy", "source_accuracy", "max_abs_err")},
        "executed": o.executed,
        "providers_used": list(o.providers_used),
        "latency_ms": o.latency_ms,
        "latency_budget_ms": p.budgets.latency_p95_ms,
        "gate": {"passed": result.passed, "reason": result.reason},
        "notes": list(o.notes),
        "seconds": round(result.seconds, 2),
        "pass_seconds": dict(o.pass_seconds),
    }


def build_report(
    model: Path, version: str, source_size: int, source_sha256: str, results: Sequence[Any]
) -> dict[str, Any]:
    entries = [_entry(r, source_size) for r in results]
    return {
        "schema": REPORT_SCHEMA,
        "model": str(model),
        "source_sha256": source_sha256,
        "version": version,
        "passed": all(e["gate"]["passed"] for e in entries),
        "profiles": entries,
    }


def _bars(title: str, unit: str, values: Sequence[tuple[str, float | None]]) -> str:
    width, row, label_w = 560, 26, 150
    shown = [v for _, v in values if v is not None]
    top = max(shown) if shown else 1.0
    parts = [
        f'<svg role="img" aria-label="{html.escape(title)}" width="{width}" height="{row * len(values) + 30}">',
        f'<text x="0" y="16" class="t">{html.escape(title)}</text>',
    ]
    for i, (label, value) in enumerate(values):
        y = 26 + i * row
        parts.append(f'<text x="0" y="{y + 15}">{html.escape(label)}</text>')
        if value is None:
            parts.append(f'<text x="{label_w}" y="{y + 15}" class="na">not measured</text>')
            continue
        w = max(1.0, (width - label_w - 90) * value / top) if top else 1.0
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="16"/>')
        parts.append(f'<text x="{label_w + w + 6:.1f}" y="{y + 15}">{value:.4g} {unit}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def render_html(report: dict[str, Any]) -> str:
    rows = report["profiles"]
    charts = [
        _bars(
            "Artifact size", "KiB", [(r["profile"], r["size_bytes"] / 1024 if r["size_bytes"] else None) for r in rows]
        ),
        _bars("Host latency p50", "ms", [(r["profile"], (r["latency_ms"] or {}).get("p50")) for r in rows]),
        _bars(
            "Top-1 accuracy",
            "%",
            [
                (r["profile"], 100 * r["metrics"]["accuracy"] if r["metrics"]["accuracy"] is not None else None)
                for r in rows
            ],
        ),
    ]
    table = "".join(
        f"<tr class={'ok' if r['gate']['passed'] else 'fail'}><td>{html.escape(r['profile'])}</td>"
        f"<td>{r['format']}</td>"
        f"<td>{r['precision']}</td><td>{r['size_bytes'] or '–'}</td><td>{_pct(r['metrics']['agreement'])}</td>"
        f"<td>{_pct(r['metrics']['accuracy'])}</td><td>{_pct(r['metrics']['source_accuracy'])}</td>"
        f"<td>{(r['latency_ms'] or {}).get('p50', '–')}</td><td>{(r['latency_ms'] or {}).get('p95', '–')}</td>"
        f"<td>{'pass' if r['gate']['passed'] else html.escape(r['gate']['reason'] or 'fail')}</td>"
        f"<td>{'<br>'.join(html.escape(n) for n in r['notes'])}</td></tr>"
        for r in rows
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgeops build report — {html.escape(report["model"])}</title>
<style>
body{{font:14px system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}} tr.fail td{{background:#fde8e8}}
svg{{display:block;margin:1em 0;font:12px system-ui,sans-serif}} svg rect{{fill:#3b7dd8}} .t{{font-weight:bold}}
.na{{fill:#999}}
</style></head><body>
<h1>edgeops build report</h1>
<p>Model <code>{html.escape(report["model"])}</code> (sha256 {report["source_sha256"][:16]}…), version
{html.escape(report["version"])}: <b>{"all profiles passed" if report["passed"] else "some profiles FAILED"}</b>.</p>
<table><tr><th>profile</th><th>format</th><th>precision</th><th>bytes</th><th>agreement</th><th>accuracy</th>
<th>source accuracy</th><th>p50 ms</th><th>p95 ms</th><th>gate</th><th>notes</th></tr>{table}</table>
{"".join(charts)}
<p>Latency is measured on the build host with each profile's runtime and thread count; the device enforces its
own latency budget in its health gate.</p>
</body></html>
"""


def write_report(out_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    write_bytes_atomic(json_path, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    write_bytes_atomic(html_path, render_html(report).encode())
    return json_path, html_path
