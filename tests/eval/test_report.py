"""The report: curves from metrics.jsonl (robust to a torn last line), Markdown and HTML from the same sections."""

from __future__ import annotations

import json
from pathlib import Path

from bioscale.eval import ReportSection, plot_training_curves, read_metrics_jsonl, write_report


def test_curves_from_metrics_jsonl(tmp_path: Path) -> None:
    rows = [{"step": s, "loss": 3.0 - 0.1 * s, "tokens_per_sec_per_gpu": 1000.0 + s} for s in range(1, 11)]
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"step": 11, "loss": 2.'  # a run killed mid-write
    (tmp_path / "metrics.jsonl").write_text(text)
    assert [r["step"] for r in read_metrics_jsonl(tmp_path / "metrics.jsonl")] == list(range(1, 11))
    png = plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "empty.jsonl").write_text('{"step": 1, "lr": 0.1}\n')
    assert plot_training_curves(tmp_path / "empty.jsonl", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_markdown_and_html_agree(tmp_path: Path) -> None:
    sections = [
        ReportSection("Perplexity", paragraphs=["on <validation>"], header=["model", "ppl"],
                      rows=[["trained", 7.123456], ["random_init", 33.0]]),
        ReportSection("Curves", image="curves.png"),
    ]
    md_path, html_path = write_report(tmp_path, "Eval & report", sections)
    md, page = md_path.read_text(), html_path.read_text()
    assert "| trained | 7.1235 |" in md and "| random_init | 33.0000 |" in md
    assert "![Curves](curves.png)" in md
    assert "<td>7.1235</td>" in page and "on &lt;validation&gt;" in page and "Eval &amp; report" in page
    assert "<img src='curves.png'" in page
