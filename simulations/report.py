"""Readable renderings of a `medfed simulate --compare` report.json: a self-contained report.html
and a report.md with the same content, and the summary `medfed simulate` prints.

The renderings present the comparison to clinicians and researchers; they compute nothing new
about the models — every number comes from the report dict (whose statistics come from
`medfed.simulations.statistics`) — except the mean ± standard deviation over runs per training
fraction for the data-efficiency curve. Both files are rendered from one list of document blocks
(`medfed.common.document`), built section by section — the answer first, on one screen
(`report_answer`: a verdict per question and a forest plot), then `report_results` and
`report_study` — so they cannot drift apart. The same dict always renders to the same bytes.
"""

from __future__ import annotations

from pathlib import Path

from medfed.common.document import Block, Plot, html_page, markdown_page, png
from medfed.simulations.report_answer import answer_section
from medfed.simulations.report_fields import GLOBAL, mode_names, report_title, summary_cell
from medfed.simulations.report_results import RESULT_SECTIONS
from medfed.simulations.report_study import STUDY_SECTIONS
from medfed.simulations.report_text import attack_text, mean_std_text

SECTIONS = (answer_section, *RESULT_SECTIONS, *STUDY_SECTIONS)


def render_html(report: dict, *, run_dir: Path) -> str:
    """The report as one HTML page; Grad-CAM files are read from `run_dir` and embedded."""
    return html_page(report_title(report), _document(report), run_dir=run_dir)


def render_markdown(report: dict) -> str:
    """The report as Markdown: the same sections and numbers, plots replaced by tables or notes."""
    return markdown_page(_document(report))


def summary_lines(report: dict) -> list[str]:
    """What `medfed simulate` prints at the end: global test metrics per mode and the tests."""
    summary = report.get("summary") or {}
    lines = [f"{'mode':<22} {'global test AUC':>17} {'accuracy':>15} {'sensitivity':>15} {'specificity':>15}"]
    for mode in mode_names(report):
        cells = [mean_std_text(summary_cell(summary, mode, GLOBAL, metric=m))
                 for m in ("auc", "accuracy", "recall", "specificity")]
        lines.append(f"{mode:<22} {cells[0]:>17} {cells[1]:>15} {cells[2]:>15} {cells[3]:>15}")
    if any(m == "local" for m in mode_names(report)):
        lines.append("(local: the best single site's model on the global test set)")
    if report.get("attack"):
        lines.append(f"(simulated attack: {attack_text(report['attack'])})")
    lines += [f"- {s['sentence']}" for s in report.get("statistics") or [] if s.get("sentence")]
    return lines


def figures(report: dict) -> dict[str, bytes]:
    """Every plot of the report as PNG bytes, by name (e.g. "roc-global"), in document order."""
    return {block.name: png(block.draw) for block in _document(report) if isinstance(block, Plot)}


def _document(report: dict) -> list[Block]:
    return [block for section in SECTIONS for block in section(report)]
