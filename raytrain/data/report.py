"""The human-readable data report: report.md with a bar chart of what each stage removed, and report.svg."""

from __future__ import annotations

from html import escape
from typing import Any

from raytrain import storage

_BAR = 40  # characters of the longest text bar


def bar_chart(rows: list[tuple[str, int]], width: int = _BAR) -> str:
    """A fixed-width text bar chart, one row per (label, count)."""
    if not rows:
        return "(nothing)"
    top = max(n for _, n in rows) or 1
    label_w = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{label_w}}  {'█' * max(1 if n else 0, round(width * n / top)):<{width}}  {n}"
                     for label, n in rows)


def svg_chart(rows: list[tuple[str, int]], title: str) -> str:
    """A horizontal bar chart as a standalone SVG (no plotting library needed)."""
    top = max([n for _, n in rows] or [1]) or 1
    row_h, label_w, bar_w = 22, 220, 420
    height = 40 + row_h * len(rows)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 80}" height="{height}" '
             'font-family="sans-serif" font-size="12">',
             f'<text x="8" y="20" font-size="14" font-weight="bold">{escape(title)}</text>']
    for i, (label, n) in enumerate(rows):
        y = 32 + i * row_h
        w = max(1, round(bar_w * n / top)) if n else 0
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{escape(label)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{w}" height="{row_h - 6}" fill="#4a7fb5"/>')
        parts.append(f'<text x="{label_w + w + 6}" y="{y + 14}">{n}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def render_markdown(report: dict[str, Any]) -> str:
    stages = list(report.get("removed_by_stage", {}).items())
    quarantined = report.get("quarantined_total", 0)
    chart_rows = [("read", report["read"]), *stages, ("quarantined", quarantined), ("kept", report["kept"])]
    lines = [
        f"# Data report: {report['dataset']}",
        "",
        f"Read **{report['read']}** rows: kept **{report['kept']}**, removed **{report['removed_total']}**, "
        f"quarantined **{quarantined}** (read, counted at the source, = kept + removed + quarantined: "
        "the stage checks it file by file).",
        "",
        "## What each stage removed",
        "",
        "![what each stage removed](report.svg)",
        "",
        "```",
        bar_chart(chart_rows),
        "```",
        "",
        "## Removed, by rule",
        "",
        "| rule | documents | share of read |",
        "|---|---:|---:|",
    ]
    read = report["read"] or 1
    for reason, n in sorted(report.get("removed", {}).items(), key=lambda kv: -kv[1]):
        lines.append(f"| `{reason}` | {n} | {100 * n / read:.1f}% |")
    lines += ["", "## Quarantined (malformed input), by reason", "", "| reason | rows |", "|---|---:|"]
    for reason, n in sorted(report.get("quarantined", {}).items(), key=lambda kv: -kv[1]):
        lines.append(f"| `{reason}` | {n} |")
    pii = report.get("pii_redacted") or {}
    if pii:
        lines += ["", "## PII redacted in kept documents", "", "| kind | redactions |", "|---|---:|"]
        lines += [f"| {k} | {n} |" for k, n in pii.items()]
    fz = report.get("fuzzy_dedup") or {}
    if fz.get("enabled") and "documents" in fz:
        lines += ["", "## Fuzzy dedup (MinHash LSH)", "",
                  f"{fz['bands']} bands x {fz['rows_per_band']} rows over word {fz['ngram']}-grams: "
                  f"{fz['documents']} documents, {fz['candidate_pairs']} candidate pairs, {fz['clusters']} clusters, "
                  f"{fz['removed']} near duplicates removed."]
    nodes = report.get("nodes") or {}
    if nodes.get("rows_annotated"):
        lines += ["", "## Work per node", "",
                  f"Rows annotated by each of the cluster's {nodes.get('cluster_nodes', '?')} nodes:", "",
                  "| node | rows |", "|---|---:|"]
        lines += [f"| `{node[:12]}` | {n} |" for node, n in nodes["rows_annotated"].items()]
    if report.get("skipped_files"):
        lines += ["", f"Skipped {len(report['skipped_files'])} input files of unknown type."]
    samples = report.get("samples") or {}
    if samples:
        lines += ["", "## Examples", ""]
        for key, docs in sorted(samples.items()):
            lines.append(f"- `{key}`: " + "; ".join(f"{escape(d['doc_id'])}: “{_one_line(d['snippet'])[:100]}”"
                                                     for d in docs[:2]))
    return "\n".join(lines) + "\n"


def _one_line(s: str) -> str:
    return " ".join(s.split()).replace("|", "/").replace("`", "'")


def write_report_md(report: dict[str, Any], out: str) -> None:
    stages = list(report.get("removed_by_stage", {}).items())
    rows = [("read", report["read"]), *stages, ("quarantined", report.get("quarantined_total", 0)),
            ("kept", report["kept"])]
    storage.write_bytes(storage.join(out, "report.md"), render_markdown(report).encode())
    svg = svg_chart(rows, f"{report['dataset']}: rows per stage")
    storage.write_bytes(storage.join(out, "report.svg"), svg.encode())
