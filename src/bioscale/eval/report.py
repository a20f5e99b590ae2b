"""The evaluation report: training curves as a PNG, and the metrics as Markdown and as a self-contained HTML page.

Both documents are rendered from the same :class:`ReportSection` list, so they never disagree. Plots use matplotlib's
Agg backend (no display needed, safe on a headless GPU node).
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def read_metrics_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``metrics.jsonl`` file; malformed lines (a run killed mid-write) are skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(float(row["step"]))
            values.append(float(value))
    return steps, values


def plot_training_curves(metrics_jsonl: str | Path, out_png: str | Path, *, title: str = "") -> Path | None:
    """Loss (and throughput, when logged) against step; ``None`` when the file has no plottable rows."""
    rows = read_metrics_jsonl(metrics_jsonl)
    loss = _series(rows, "loss")
    if not loss[0]:
        logger.warning("no loss values in %s; skipping the training-curve plot", metrics_jsonl)
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    throughput = _series(rows, "tokens_per_sec_per_gpu")
    panels = 2 if throughput[0] else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot(*loss, marker="." if len(loss[0]) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats / token)")
    ax.grid(alpha=0.3)
    if panels == 2:
        ax = axes[0][1]
        ax.plot(*throughput, color="tab:green")
        ax.set_xlabel("step")
        ax.set_ylabel("tokens / s / device")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


@dataclass
class ReportSection:
    """A heading with optional paragraphs, a table (header + rows) and an image (path relative to the report)."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    image: str | None = None


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return "" if value is None else str(value)


def render_markdown(title: str, sections: Sequence[ReportSection]) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        if section.header:
            lines.append("| " + " | ".join(section.header) + " |")
            lines.append("|" + "|".join("---" for _ in section.header) + "|")
            lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in section.rows]
            lines.append("")
        if section.image:
            lines += [f"![{section.title}]({section.image})", ""]
    return "\n".join(lines)


def render_html(title: str, sections: Sequence[ReportSection]) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        f"<html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}"
        "th{background:#f4f4f4}code{background:#f4f4f4;padding:1px 4px}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{esc(section.title)}</h2>")
        parts += [f"<p>{esc(p)}</p>" for p in section.paragraphs]
        if section.header:
            parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in section.header) + "</tr>")
            for row in section.rows:
                parts.append("<tr>" + "".join(f"<td>{esc(_cell(v))}</td>" for v in row) + "</tr>")
            parts.append("</table>")
        if section.image:
            parts.append(f"<img src='{esc(section.image)}' alt='{esc(section.title)}' style='max-width:100%'>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(out_dir: str | Path, title: str, sections: Sequence[ReportSection]) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir``; return both paths."""
    out_dir = Path(out_dir)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(render_markdown(title, sections))
    html_path.write_text(render_html(title, sections))
    return md_path, html_path
