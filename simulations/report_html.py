"""Readable renderings of a `medfed simulate --compare` report.json: a self-contained report.html
and a report.md with the same content.

This module owns how the comparison is presented to clinicians and researchers: the order of the
sections, the wording of their sentences, number formatting, and every plot. It computes nothing
new about the models — every number comes from the report dict (whose statistics come from
`medfed.simulations.statistics`) — except the mean ± standard deviation over runs per training
fraction for the data-efficiency curve.

Both outputs are rendered from one list of blocks (headings, paragraphs, tables, plots, image
galleries), so they cannot drift apart. Plots are drawn with matplotlib's Agg canvas and embedded
as base64 PNG; the HTML needs no network, no JavaScript and no file beside it. The same dict always
renders to the same bytes.
"""

from __future__ import annotations

import base64
import html
import io
import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from medfed.common.dataset import SPLITS
from medfed.common.metrics import MISSING, PER_CLASS_SCALARS, format_number
from medfed.common.metrics import SCALARS as METRICS
from medfed.simulations.statistics import format_p, mean_std

METRIC_HEADERS = {
    "accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy", "precision": "Precision",
    "recall": "Sensitivity", "specificity": "Specificity", "f1": "F1", "auc": "AUC",
}
GLOBAL = "global"
DPI = 100
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODE_MEANINGS = {
    "federated": "one shared model trained across the sites; images never leave their site",
    "centralized": "one model trained on all sites' images pooled in one place (the upper "
                   "reference that federated learning tries to reach)",
    "local": "each site trains its own model on its own images only",
    "scratch": "federated training starting from random weights instead of ImageNet weights",
}
CLASSICAL_MODELS = {"svm": "support vector machine", "rf": "random forest"}
CLASSICAL_FEATURES = {"pixels": "raw pixel values", "cnn": "features from the pretrained CNN"}
# Fixed style so the PNG bytes do not depend on a user's matplotlibrc; parse_math is off because a
# site or class name containing "$" would otherwise be parsed (or fail) as a formula.
STYLE = {
    "font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "text.parse_math": False,
    "axes.grid": False, "lines.linewidth": 1.5, "image.cmap": "Blues",
}
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1b1f24;
max-width:1150px;margin:0 auto;padding:1.5rem;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.4rem}h2{font-size:1.25rem;margin-top:2.2rem;
border-bottom:2px solid #d0d7de;padding-bottom:.2rem}h3{font-size:1.05rem;margin-top:1.4rem}
table{border-collapse:collapse;margin:.6rem 0 1rem;font-size:.85rem}
caption{text-align:left;font-weight:600;padding:.2rem 0}
th,td{border:1px solid #d0d7de;padding:.25rem .5rem;text-align:left;vertical-align:top}
thead th{background:#f3f5f7}tbody tr:nth-child(even){background:#fafbfc}
figure{margin:.8rem 0}figure img{max-width:100%;height:auto}
figcaption{font-size:.85rem;color:#444}ul{padding-left:1.3rem}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:.8rem}
.gallery figure{margin:0}.note{color:#6a4b00;font-size:.85rem}
details{margin:.5rem 0;border:1px solid #d0d7de;border-radius:4px;padding:.3rem .6rem}
summary{cursor:pointer;font-weight:600}
"""


# --- document blocks -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Items:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str | None = None


@dataclass(frozen=True)
class Plot:
    """A matplotlib figure; Markdown shows `fallback` (tables of the same numbers) or a note."""
    name: str
    caption: str
    draw: Callable[[], Figure]
    fallback: tuple[Table, ...] = ()


@dataclass(frozen=True)
class Picture:
    file: str
    caption: str


@dataclass(frozen=True)
class Gallery:
    title: str
    pictures: tuple[Picture, ...]


@dataclass(frozen=True)
class Folded:
    """Detail a reader opens when they want it (HTML `<details>`); Markdown shows it all."""
    summary: str
    blocks: tuple


Block = Heading | Paragraph | Items | Table | Plot | Gallery | Folded


# --- public API ----------------------------------------------------------------------------------

def render_html(report: dict, *, run_dir: Path) -> str:
    """The report as one HTML page; Grad-CAM files are read from `run_dir` and embedded."""
    blocks = _document(report)
    body = "\n".join(_html_block(block, run_dir=Path(run_dir)) for block in blocks)
    title = html.escape(_title(report))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{title}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n{body}\n"
        "</main>\n</body>\n</html>\n"
    )


def render_markdown(report: dict) -> str:
    """The report as Markdown: the same sections and numbers, plots replaced by tables or notes."""
    return "\n\n".join(_markdown_block(block) for block in _document(report)) + "\n"


def summary_lines(report: dict) -> list[str]:
    """What `medfed simulate` prints at the end: global test metrics per mode and the tests."""
    summary = report.get("summary") or {}
    lines = [f"{'mode':<22} {'global test AUC':>17} {'accuracy':>15} {'sensitivity':>15} {'specificity':>15}"]
    for mode in _modes(report):
        cells = [_mean_std(_cell(summary, mode, GLOBAL, metric=m))
                 for m in ("auc", "accuracy", "recall", "specificity")]
        lines.append(f"{mode:<22} {cells[0]:>17} {cells[1]:>15} {cells[2]:>15} {cells[3]:>15}")
    if any(m == "local" for m in _modes(report)):
        lines.append("(local: the best single site's model on the global test set)")
    if report.get("attack"):
        lines.append(f"(simulated attack: {_attack_text(report['attack'])})")
    lines += [f"- {s['sentence']}" for s in report.get("statistics") or [] if s.get("sentence")]
    return lines


def figures(report: dict) -> dict[str, bytes]:
    """Every plot of the report as PNG bytes, by name (e.g. "roc-global"), in document order."""
    return {block.name: _png(block.draw) for block in _document(report) if isinstance(block, Plot)}


# --- formatting ----------------------------------------------------------------------------------

def _mean_std(cell: dict | None) -> str:
    if not cell or cell.get("mean") is None:
        return MISSING
    if cell.get("std") is None:
        return format_number(cell["mean"])
    return f"{format_number(cell['mean'])} ± {format_number(cell['std'])}"


def _with_ci(value: float | None, ci: Sequence[float | None] | None) -> str:
    if value is None:
        return MISSING
    if not ci or ci[0] is None or ci[1] is None:
        return format_number(value)
    if ci[0] == ci[1]:
        # Every bootstrap resample agreed (e.g. all 9 images right): the percentile interval has
        # no width, which says nothing about certainty.
        return f"{format_number(value)} (interval not estimable)"
    return f"{format_number(value)} ({format_number(ci[0])}–{format_number(ci[1])})"


def _p(p: float | None) -> str:
    return format_p(p).removeprefix("= ")


def _megabytes(count: float | None) -> str:
    return MISSING if count is None else f"{count / 1e6:.3f} MB"


def _fraction(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _listing(words: Sequence[str]) -> str:
    words = [str(w) for w in words]
    if len(words) <= 2:
        return " and ".join(words)
    return ", ".join(words[:-1]) + ", and " + words[-1]


def _plural(count: int, noun: str) -> str:
    ending = "es" if noun.endswith("s") else "s"
    return f"{count} {noun}{'' if count == 1 else ending}"


def _sentence(text: str) -> str:
    text = str(text).strip()
    return text if not text or text.endswith((".", "!", "?")) else text + "."


def _where(site: str) -> str:
    return "the global test set" if site == GLOBAL else f"site {site}"


def _site_label(report: dict, site: str) -> str:
    """A site's name, flagged when it was a simulated attacker."""
    return f"{site} (attacker)" if site in _attackers(report) else site


def _attackers(report: dict) -> list[str]:
    return list((report.get("attack") or {}).get("sites") or [])


def _attack_text(attack: dict) -> str:
    sites = list(attack.get("sites") or [])
    return (f"{attack.get('kind')} by {_plural(len(sites), 'site')} ({_listing(sites)}): "
            f"{attack.get('effect') or MISSING}")


# --- reading the report --------------------------------------------------------------------------

def _title(report: dict) -> str:
    name = (report.get("dataset") or {}).get("name") or "unnamed dataset"
    return f"medfed comparison report: {name}"


def _classes(report: dict) -> list[str]:
    return [str(c) for c in (report.get("dataset") or {}).get("classes") or []]


def _modes(report: dict) -> list[str]:
    return list(report.get("modes") or [])


def _sites(report: dict) -> list[str]:
    """Sites in report order; names seen only in the summary or the first run's results are
    appended, so no site's numbers are dropped."""
    names = list(report.get("sites") or {})
    tables = [*(report.get("summary") or {}).values(),
              *((e or {}).get("results") for e in (_first_run(report).get("modes") or {}).values())]
    for per_site in tables:
        names += [s for s in per_site or {} if s != GLOBAL and s not in names]
    return names


def _runs(report: dict) -> list[dict]:
    return list(report.get("runs") or [])


def _first_run(report: dict) -> dict:
    runs = _runs(report)
    return runs[0] if runs else {"modes": {}}


def _entry(run: dict, mode: str) -> dict:
    return (run.get("modes") or {}).get(mode) or {}


def _results_at(run: dict, modes: Sequence[str], site: str) -> list[tuple[str, dict]]:
    """(label, RESULT) of every model tested on `site`; on the global test set that includes each
    local site model, since local training has no single global model."""
    found = []
    for mode in modes:
        entry = _entry(run, mode)
        result = (entry.get("results") or {}).get(site)
        if result:
            found.append((mode, result))
        if site == GLOBAL:
            for owner, local in (entry.get("local_on_global") or {}).items():
                found.append((f"{mode} (model of site {owner})", local))
    return found


def _global_auc(entry: dict) -> float | None:
    """A mode's global test AUC in one run; for local, the best site model's (as in summary)."""
    result = (entry.get("results") or {}).get(GLOBAL)
    if result:
        return (result.get("metrics") or {}).get("auc")
    models = (entry.get("local_on_global") or {}).values()
    aucs = [a for a in ((r.get("metrics") or {}).get("auc") for r in models) if a is not None]
    return max(aucs) if aucs else None


def _mode_meaning(mode: str) -> str:
    if mode in MODE_MEANINGS:
        return MODE_MEANINGS[mode]
    parts = mode.split("-")
    if len(parts) == 3 and parts[0] == "classical":
        model = CLASSICAL_MODELS.get(parts[1], parts[1])
        features = CLASSICAL_FEATURES.get(parts[2], parts[2])
        return f"a {model} (classical machine learning) trained on {features} of the pooled images"
    return "no description available"


# --- plotting ------------------------------------------------------------------------------------

def _png(draw: Callable[[], Figure]) -> bytes:
    with matplotlib.rc_context(STYLE):
        figure = draw()
        buffer = io.BytesIO()
        # No "Software" entry: it carries the matplotlib version, and the bytes must be stable.
        figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _grid(count: int, *, columns: int, panel: tuple[float, float]) -> tuple[Figure, list]:
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    figure = _figure(panel[0] * columns, panel[1] * rows)
    axes = list(figure.subplots(rows, columns, squeeze=False).flat)
    for unused in axes[count:]:
        unused.set_visible(False)
    return figure, axes[:count]


def _color(report: dict, label: str, *, extra: int = 0):
    """A mode keeps its colour in every plot; other labels (one local model per site) take the
    colours after the modes', numbered by `extra`."""
    modes = _modes(report)
    palette = matplotlib.colormaps["tab10"].colors
    index = modes.index(label) if label in modes else len(modes) + extra
    return palette[index % len(palette)]


def _integer_rounds(*axes) -> None:
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _series(values: Sequence[float | None]) -> np.ndarray:
    # None becomes NaN, which matplotlib draws as a gap instead of failing.
    return np.array([np.nan if v is None else v for v in values], dtype=float)


# --- section 1: title and summary ----------------------------------------------------------------

def _summary_section(report: dict) -> list[Block]:
    dataset = report.get("dataset") or {}
    partition = report.get("partition") or {}
    modes, sites, classes, runs = _modes(report), _sites(report), _classes(report), _runs(report)
    seeds = report.get("seeds") or []
    fractions = report.get("train_fractions") or []
    text = [
        f"This report compares {len(modes)} ways of training an image classifier "
        f"({_listing(modes)}) on the {dataset.get('name') or 'unnamed'} dataset "
        f"({_plural(len(classes), 'class')}: {_listing(classes)}).",
        f"The images were divided among {_plural(len(sites), 'simulated hospital site')} "
        f"({_listing(sites) or 'none named'}) "
        f"with the {partition.get('scheme') or 'unstated'} partition"
        + (f" (alpha = {partition['alpha']:g})" if partition.get("alpha") is not None else "")
        + "; every mode was trained on the same site splits and tested on each site's own test "
          "images and on a shared global test set.",
    ]
    if partition.get("site_split") or partition.get("global_test"):
        text.append(f"Site splits: {partition.get('site_split') or MISSING}; "
                    f"global test set: {partition.get('global_test') or MISSING}.")
    design = f"seeds {_listing([str(s) for s in seeds])}" if seeds else "no seeds recorded"
    if report.get("folds"):
        design += f", {report['folds']} cross-validation folds"
    if len(fractions) > 1:
        design += f", training fractions {_listing([_fraction(f) for f in fractions])}"
    text.append(f"Runs: {design} ({_plural(len(runs), 'run')} in total).")
    if report.get("budget"):
        text.append(_sentence(report["budget"]))
    for comparison in report.get("statistics") or []:
        text.append(_sentence(comparison.get("sentence") or ""))
    glossary = tuple(f"{mode}: {_mode_meaning(mode)}" for mode in modes)
    attack = []
    if report.get("attack"):
        attack = [Paragraph(
            f"Simulated attack: {_attack_text(report['attack'])}. Strategy: "
            f"{((report.get('config') or {}).get('federation') or {}).get('strategy') or MISSING}. "
            "Results at the attacking sites are reported but flagged \"(attacker)\": they are "
            "not evidence about the method. The attack changes only what the attackers train on or "
            "send back; every test set keeps its true labels.")]
    return [Heading(1, _title(report)), Heading(2, "1. Summary"), Paragraph(" ".join(text)),
            *attack, Paragraph("Training modes:"), Items(glossary)]


# --- section 2: mode x site table ----------------------------------------------------------------

def _overview_section(report: dict) -> list[Block]:
    modes, sites, summary = _modes(report), _sites(report), report.get("summary") or {}
    columns = [*sites, GLOBAL]
    counts = sorted({(_cell(summary, m, s, metric="auc") or {}).get("n", 0)
                     for m in modes for s in columns} - {0})
    over = (_plural(counts[0], "run") if len(counts) == 1
            else f"{counts[0]}–{counts[-1]} runs" if counts else "the runs")
    blocks: list[Block] = [Heading(2, "2. Test results by mode and site"), Paragraph(
        f"Each cell is the mean ± standard deviation over {over} of the model tested on that "
        "site's test images; \"global\" is the shared global test set. For local training, "
        "\"global\" is the best single-site model on the global test set.")]
    for metric, caption in (("auc", "Test AUC (area under the ROC curve)"),
                            ("accuracy", "Test accuracy")):
        rows = tuple((mode, *(_mean_std(_cell(summary, mode, s, metric=metric)) for s in columns))
                     for mode in modes)
        blocks.append(Table(("Mode", *(_site_label(report, c) for c in columns)), rows, caption))
    return blocks


def _cell(summary: dict, mode: str, site: str, *, metric: str) -> dict | None:
    return ((summary.get(mode) or {}).get(site) or {}).get(metric)


# --- section 3: first-run detail -----------------------------------------------------------------

def _detail_section(report: dict) -> list[Block]:
    run, modes, classes = _first_run(report), _modes(report), _classes(report)
    fold = f", fold {run['fold']}" if run.get("fold") is not None else ""
    fraction = f", training fraction {_fraction(run['fraction'])}" if "fraction" in run else ""
    averaged = ("" if len(classes) == 2 else " With more than two classes, precision, "
                "sensitivity, specificity and F1 are averaged over the classes, and AUC is the "
                "average one-versus-rest AUC.")
    blocks: list[Block] = [Heading(2, "3. Detailed results of the first run"), Paragraph(
        f"Seed {run.get('seed', MISSING)}{fold}{fraction}. Each value is followed by its 95% "
        "confidence interval in brackets. Accuracy: share of images classified correctly. "
        "Balanced accuracy: accuracy averaged over classes, so a rare class counts as much as a "
        f"common one. Precision: share of positive calls that were right (positive class: "
        f"{classes[1] if len(classes) == 2 else 'each class in turn'}). Sensitivity (recall): "
        "share of truly positive images found. Specificity: share of truly negative images "
        "called negative. F1: balance of precision and sensitivity. AUC: how well the scores "
        "rank positive above negative images (0.5 is chance, 1.0 is perfect)." + averaged
        + _estimable_rule(report))]
    for site in [*_sites(report), GLOBAL]:
        found = _results_at(run, modes, site)
        if found:
            blocks += _site_detail(site, found, report=report)
    return blocks


def _estimable_rule(report: dict) -> str:
    minimum = ((report.get("config") or {}).get("evidence") or {}).get("min_per_class")
    if minimum is None:
        return ""
    return (f" Where a test split holds fewer than {minimum} images of a class, every metric but "
            f"accuracy is shown as not estimable (and left out of the paired tests) instead of a "
            f"number whose interval would mean nothing.")


def _site_detail(site: str, found: list[tuple[str, dict]], *, report: dict) -> list[Block]:
    heading = "Global test set" if site == GLOBAL else f"Site {_site_label(report, site)}"
    rows = tuple(
        (label, *(result["not_estimable"] if result.get("not_estimable") and m in PER_CLASS_SCALARS
                  else _with_ci((result.get("metrics") or {}).get(m), (result.get("ci") or {}).get(m))
                  for m in METRICS), str((result.get("metrics") or {}).get("n", MISSING)))
        for label, result in found)
    blocks: list[Block] = [
        Table(("Model", *(METRIC_HEADERS[m] for m in METRICS), "Images"), rows,
              f"Test metrics on {_where(site)} with 95% confidence intervals"),
    ]
    operating = _operating_table(found, site=site)
    if operating:
        blocks.append(operating)
    confusion = _confusion_plot(site, found, classes=_classes(report))
    blocks += [confusion] if confusion else []
    if site == GLOBAL:
        return [Heading(3, heading), *blocks]
    return [Folded(f"{heading}: test metrics, operating points and confusion matrices",
                   (Heading(3, heading), *blocks))]


def _operating_table(found: list[tuple[str, dict]], *, site: str) -> Table | None:
    rows = []
    for label, result in found:
        points = result.get("operating_points")
        if not points:
            continue
        half, youden = points.get("at_0.5") or {}, points.get("at_youden") or {}
        rows.append((label, format_number(half.get("sensitivity")), format_number(half.get("specificity")),
                     format_number(points.get("youden_threshold")), format_number(youden.get("sensitivity")),
                     format_number(youden.get("specificity"))))
    if not rows:
        return None
    return Table(
        ("Model", "Sensitivity at 0.5", "Specificity at 0.5", "Youden threshold",
         "Sensitivity at Youden", "Specificity at Youden"), tuple(rows),
        f"Operating points on {_where(site)}: the default threshold 0.5 and the threshold "
        "chosen on validation data to maximise sensitivity + specificity (Youden)")


def _confusion_plot(site: str, found: list[tuple[str, dict]], *, classes: list[str]
                    ) -> Plot | None:
    matrices = [(label, (result.get("metrics") or {}).get("confusion_matrix"))
                for label, result in found]
    matrices = [(label, m) for label, m in matrices if m]
    if not matrices:
        return None
    names = classes or [str(i) for i in range(len(matrices[0][1]))]

    def draw() -> Figure:
        figure, axes = _grid(len(matrices), columns=4, panel=(2.6, 2.5))
        for ax, (label, matrix) in zip(axes, matrices):
            _heatmap(ax, np.array(matrix), names=names, title=label)
        return figure

    fallback = tuple(
        Table(("true \\ predicted", *names),
              tuple((names[i] if i < len(names) else str(i), *map(str, row))
                    for i, row in enumerate(matrix)),
              f"Confusion matrix, {label}, {_where(site)}")
        for label, matrix in matrices)
    return Plot(f"confusion-{site}", f"Confusion matrices on {_where(site)} (rows: true "
                "class, columns: predicted class)", draw, fallback)


def _heatmap(ax, matrix: np.ndarray, *, names: list[str], title: str) -> None:
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max(initial=0)), 1))
    threshold = matrix.max(initial=0) / 2
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if count > threshold else "black")
    # A matrix wider than the class list (a report missing class names) still gets every tick.
    labels = [names[i] if i < len(names) else str(i) for i in range(len(matrix))]
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(textwrap.fill(title, 22))


# --- section 4: ROC curves -----------------------------------------------------------------------

def _roc_section(report: dict) -> list[Block]:
    run, modes = _first_run(report), _modes(report)
    blocks: list[Block] = [Heading(2, "4. ROC curves"), Paragraph(
        "Each curve shows, for every possible threshold, the share of positive images found "
        "(sensitivity) against the share of negative images wrongly flagged (1 − specificity), "
        "for the first run. The diagonal is chance.")]
    plots = []
    for site in [GLOBAL, *_sites(report)]:
        curves = [(label, r) for label, r in _results_at(run, modes, site) if r.get("roc")]
        if curves:
            plots.append(Plot(f"roc-{site}", f"ROC curves on {_where(site)}",
                              _roc_drawer(report, curves, title=_where(site))))
    if not plots:
        classes = _classes(report)
        reason = (f"this dataset has {len(classes)} classes and ROC curves are drawn for "
                  "two-class tasks only" if len(classes) != 2
                  else "the report holds no ROC curve data")
        return [*blocks, Paragraph(f"No ROC curves: {reason}.")]
    return blocks + plots


def _roc_drawer(report: dict, curves: list[tuple[str, dict]], *, title: str
                ) -> Callable[[], Figure]:
    def draw() -> Figure:
        figure = _figure(5.2, 4.2)
        ax = figure.add_subplot()
        ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
        others = [label for label, _ in curves if label not in _modes(report)]
        for label, result in curves:
            auc = (result.get("metrics") or {}).get("auc")
            extra = others.index(label) if label in others else 0
            ax.plot(result["roc"]["fpr"], result["roc"]["tpr"],
                    color=_color(report, label, extra=extra),
                    linestyle="--" if label in others else "-", label=f"{label} (AUC {format_number(auc)})")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 − specificity (false positive rate)",
               ylabel="sensitivity (true positive rate)", title=f"ROC curves on {title}")
        ax.legend(loc="lower right")
        return figure
    return draw


# --- section 5: learning curves ------------------------------------------------------------------

def _learning_section(report: dict) -> list[Block]:
    run = _first_run(report)
    histories = {m: _entry(run, m)["history"] for m in _modes(report)
                 if _entry(run, m).get("history")}
    blocks: list[Block] = [Heading(2, "5. Learning curves")]
    if not histories:
        return [*blocks, Paragraph("No mode recorded a training history in this report.")]
    blocks.append(Paragraph(
        "How the models improved during training in the first run: per round for federated "
        "modes, per epoch for centralized training. Global test AUC should rise and validation "
        "loss fall; a validation loss that rises again means over-fitting."))
    sites = _sites(report)
    blocks.append(Plot("learning-global", "Global test AUC and validation loss per round",
                       _global_curves(report, histories), (_history_table(histories),)))
    blocks.append(Plot("learning-sites", "Validation AUC per site and round",
                       _site_curves(histories, sites=sites),
                       (_site_history_table(histories, sites=sites),)))
    return blocks


def _global_curves(report: dict, histories: dict[str, list[dict]]) -> Callable[[], Figure]:
    def draw() -> Figure:
        figure = _figure(8.4, 3.2)
        auc_ax, loss_ax = figure.subplots(1, 2)
        for mode, history in histories.items():
            rounds = [h.get("round") for h in history]
            style = {"color": _color(report, mode), "marker": "o", "markersize": 3, "label": mode}
            auc_ax.plot(rounds, _series([h.get("global_auc") for h in history]), **style)
            loss_ax.plot(rounds, _series([h.get("val_loss") for h in history]), **style)
        auc_ax.set(xlabel="round (centralized: epoch)", ylabel="global test AUC",
                   title="Global test AUC")
        loss_ax.set(xlabel="round (centralized: epoch)", ylabel="validation loss",
                    title="Validation loss (all sites)")
        _integer_rounds(auc_ax, loss_ax)
        auc_ax.legend()
        return figure
    return draw


def _site_curves(histories: dict[str, list[dict]], *, sites: list[str]) -> Callable[[], Figure]:
    def draw() -> Figure:
        figure, axes = _grid(len(histories), columns=3, panel=(3.2, 2.7))
        palette = matplotlib.colormaps["tab10"].colors
        for ax, (mode, history) in zip(axes, histories.items()):
            rounds = [h.get("round") for h in history]
            for index, site in enumerate(sites):
                values = [((h.get("sites") or {}).get(site) or {}).get("val_auc") for h in history]
                ax.plot(rounds, _series(values), color=palette[index % len(palette)],
                        marker="o", markersize=3, label=site)
            ax.set(xlabel="round (centralized: epoch)", ylabel="validation AUC", title=mode)
            _integer_rounds(ax)
        if axes:
            figure.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper",
                          title="site")
        return figure
    return draw


def _history_table(histories: dict[str, list[dict]]) -> Table:
    rows = []
    for mode, history in histories.items():
        aucs = [(h["global_auc"], h.get("round")) for h in history
                if h.get("global_auc") is not None]
        best = max(aucs, key=lambda pair: pair[0]) if aucs else None
        rows.append((mode, str(len(history)), format_number(aucs[0][0]) if aucs else MISSING,
                     format_number(aucs[-1][0]) if aucs else MISSING,
                     f"{format_number(best[0])} (round {best[1]})" if best else MISSING,
                     format_number(history[-1].get("val_loss"))))
    return Table(("Mode", "Rounds or epochs", "First global AUC", "Last global AUC",
                  "Best global AUC", "Last validation loss"), tuple(rows),
                 "Learning curves in numbers")


def _site_history_table(histories: dict[str, list[dict]], *, sites: list[str]) -> Table:
    rows = tuple((mode, *(format_number(((history[-1].get("sites") or {}).get(s) or {}).get("val_auc"))
                          for s in sites)) for mode, history in histories.items())
    return Table(("Mode", *sites), rows, "Validation AUC per site after the last round or epoch")


# --- section 6: statistics -----------------------------------------------------------------------

def _statistics_section(report: dict) -> list[Block]:
    comparisons = report.get("statistics") or []
    blocks: list[Block] = [Heading(2, "6. Statistical comparisons")]
    if not comparisons:
        return [*blocks, Paragraph("No statistical comparisons in this report.")]
    blocks.append(Paragraph(
        "Each comparison pairs two modes on the same site and run. Wins, ties and losses count "
        "the pairs where the first mode scored higher, equal or lower. The Wilcoxon signed-rank "
        "and paired t-test p-values say how surprising the difference would be if the modes were "
        "equally good; d_z is the mean difference divided by the standard deviation of the "
        "differences (about 0.2 small, 0.5 medium, 0.8 large)."))
    rows = tuple(_statistics_row(c) for c in comparisons)
    blocks.append(Table(("Comparison", "Metric", "Pairs", "Mean difference", "Wins/ties/losses",
                         "Wilcoxon p", "t-test p", "Effect size d_z", "In words"), rows))
    return blocks


def _statistics_row(comparison: dict) -> tuple[str, ...]:
    difference = comparison.get("mean_difference")
    return (f"{comparison.get('label_a')} vs {comparison.get('label_b')}",
            str(comparison.get("metric", MISSING)).upper(), str(comparison.get("n", MISSING)),
            MISSING if difference is None or not math.isfinite(difference)
            else f"{difference:+.3f}",
            "/".join(str(comparison.get(k, 0)) for k in ("wins", "ties", "losses")),
            _p(comparison.get("wilcoxon_p")), _p(comparison.get("ttest_p")),
            format_number(comparison.get("cohens_dz")), _sentence(comparison.get("sentence") or ""))


# --- section 7: data efficiency ------------------------------------------------------------------

def _efficiency_section(report: dict) -> list[Block]:
    fractions = sorted(report.get("train_fractions") or [])
    blocks: list[Block] = [Heading(2, "7. Data efficiency")]
    if len(fractions) <= 1:
        used = _fraction(fractions[0]) if fractions else "100%"
        return [*blocks, Paragraph(f"All runs used the same share of the training images "
                                   f"({used}), so there is no data-efficiency curve.")]
    cells = _efficiency_cells(report, fractions)
    blocks.append(Paragraph(
        "Global test AUC when each site trains on only part of its training images (mean ± "
        "standard deviation over runs). A flat curve means the mode needs little data. For local "
        "training, the best single-site model is shown."))
    rows = tuple((mode, *(_mean_std(cells[mode][f]) for f in fractions)) for mode in cells)
    table = Table(("Mode", *(_fraction(f) for f in fractions)), rows,
                  "Global test AUC by share of training images used")
    return [*blocks, Plot("data-efficiency", "Global test AUC against share of training images",
                          _efficiency_drawer(report, cells, fractions)), table]


def _efficiency_cells(report: dict, fractions: list[float]) -> dict[str, dict[float, dict]]:
    cells = {}
    for mode in _modes(report):
        by_fraction = {f: [] for f in fractions}
        for run in _runs(report):
            if run.get("fraction") in by_fraction:
                by_fraction[run["fraction"]].append(_global_auc(_entry(run, mode)))
        cells[mode] = {f: mean_std(values) for f, values in by_fraction.items()}
    return cells


def _efficiency_drawer(report: dict, cells: dict[str, dict[float, dict]],
                       fractions: list[float]) -> Callable[[], Figure]:
    def draw() -> Figure:
        figure = _figure(5.6, 3.8)
        ax = figure.add_subplot()
        for mode, by_fraction in cells.items():
            means = _series([by_fraction[f]["mean"] for f in fractions])
            stds = np.nan_to_num(_series([by_fraction[f]["std"] for f in fractions]))
            ax.errorbar(fractions, means, yerr=stds, color=_color(report, mode), marker="o",
                        markersize=3, capsize=3, label=mode)
        ax.set_xscale("log")
        ax.set_xticks(fractions, [_fraction(f) for f in fractions])
        ax.minorticks_off()
        ax.set(xlabel="share of training images used", ylabel="global test AUC",
               title="Data efficiency")
        ax.legend()
        return figure
    return draw


# --- section 8: sites ----------------------------------------------------------------------------

def _sites_section(report: dict) -> list[Block]:
    sites, classes = report.get("sites") or {}, _classes(report)
    blocks: list[Block] = [Heading(2, "8. Sites and label distribution")]
    if not sites:
        return [*blocks, Paragraph("The report lists no sites.")]
    blocks.append(Paragraph(
        "How many images of each class every site holds in its training, validation and test "
        "splits. Unequal bars mean the sites differ (non-IID data), which is what makes "
        "federated learning hard."))
    width = max([len(classes)] + [len(h) for s in sites.values()
                                  for h in (s.get("label_histogram") or {}).values() if h])
    names = classes + [f"class {i}" for i in range(len(classes), width)]
    rows = []
    for site, info in sites.items():
        for split in SPLITS:
            counts = list((info.get("label_histogram") or {}).get(split) or [])
            rows.append((_site_label(report, site), split, str((info.get("n") or {}).get(split, MISSING)),
                         *(str(c) for c in counts + [MISSING] * (width - len(counts)))))
    return [*blocks, Plot("label-histograms", "Images per class, site and split",
                          _histogram_drawer(sites, names)),
            Folded("Images per site and split, as a table",
                   (Table(("Site", "Split", "Images", *names), tuple(rows),
                          "Images per site and split"),))]


def _histogram_drawer(sites: dict[str, dict], names: list[str]) -> Callable[[], Figure]:
    def draw() -> Figure:
        figure = _figure(9.6, 3.2)
        palette = matplotlib.colormaps["tab10"].colors
        positions = np.arange(len(sites))
        width = 0.8 / max(len(names), 1)
        for ax, split in zip(figure.subplots(1, len(SPLITS), sharey=True), SPLITS):
            for index, name in enumerate(names):
                counts = [_count(info, split, index) for info in sites.values()]
                ax.bar(positions + (index - (len(names) - 1) / 2) * width, counts, width,
                       color=palette[index % len(palette)], label=name)
            ax.set_xticks(positions, list(sites), rotation=30, ha="right")
            ax.set_title(split)
        figure.axes[0].set_ylabel("images")
        figure.legend(*figure.axes[0].get_legend_handles_labels(), loc="outside right upper",
                      title="class")
        return figure
    return draw


def _count(info: dict, split: str, index: int) -> int:
    counts = (info.get("label_histogram") or {}).get(split) or []
    return counts[index] if index < len(counts) else 0


# --- section 9: communication and time -----------------------------------------------------------

def _cost_section(report: dict) -> list[Block]:
    runs, modes = _runs(report), _modes(report)
    blocks: list[Block] = [Heading(2, "9. Communication and time")]
    rows, costs = [], {}
    for mode in modes:
        up = mean_std([(_entry(r, mode).get("bytes") or {}).get("up") for r in runs])
        down = mean_std([(_entry(r, mode).get("bytes") or {}).get("down") for r in runs])
        wall = mean_std([_entry(r, mode).get("wall_s") for r in runs])
        costs[mode] = (up["mean"], down["mean"], wall)
        spread = f" ± {wall['std']:.1f}" if wall["std"] is not None else ""
        rows.append((mode, _megabytes(up["mean"]), _megabytes(down["mean"]),
                     MISSING if wall["mean"] is None else f"{wall['mean']:.1f}{spread} s"))
    total = (report.get("timing") or {}).get("wall_s")
    text = ("Data sent between the sites and the server (mean per run; only federated modes "
            "communicate) and training time per mode (mean ± standard deviation over runs).")
    if total is not None:
        text += f" The whole comparison took {total / 60:.1f} minutes."
    measured = any(v is not None for up, down, wall in costs.values()
                   for v in (up, down, wall["mean"]))
    plot = [Plot("communication", "Data sent and wall time per mode",
                 _cost_drawer(report, costs))] if measured else []
    return [*blocks, Paragraph(text), *plot,
            Table(("Mode", "Sent by sites (up)", "Sent to sites (down)", "Wall time"),
                  tuple(rows), "Communication and time per mode")]


def _cost_drawer(report: dict, costs: dict[str, tuple]) -> Callable[[], Figure]:
    def draw() -> Figure:
        figure = _figure(9.0, 3.2)
        bytes_ax, time_ax = figure.subplots(1, 2)
        talking = [m for m, (up, down, _) in costs.items() if up is not None or down is not None]
        positions = np.arange(len(talking))
        for offset, (direction, slot) in zip((-0.2, 0.2), (("up", 0), ("down", 1))):
            bytes_ax.bar(positions + offset, [(costs[m][slot] or 0) / 1e6 for m in talking], 0.4,
                         label=direction)
        bytes_ax.set_xticks(positions, talking, rotation=30, ha="right")
        bytes_ax.set(ylabel="MB per run", title="Data sent")
        if talking:
            bytes_ax.legend()
        timed = [m for m, cost in costs.items() if cost[2]["mean"] is not None]
        time_ax.bar(range(len(timed)), [costs[m][2]["mean"] for m in timed],
                    yerr=[costs[m][2]["std"] or 0 for m in timed], capsize=3,
                    color=[_color(report, m) for m in timed])
        time_ax.set_xticks(range(len(timed)), timed, rotation=30, ha="right")
        time_ax.set(ylabel="seconds", title="Wall time")
        return figure
    return draw


# --- section 10: Grad-CAM ------------------------------------------------------------------------

def _gradcam_section(report: dict) -> list[Block]:
    examples = report.get("gradcam") or []
    blocks: list[Block] = [Heading(2, "10. Grad-CAM examples")]
    if not examples:
        return [*blocks, Paragraph("No Grad-CAM images in this report.")]
    blocks.append(Paragraph(
        "Grad-CAM colours the image regions that most influenced the model's decision (warm "
        "colours: strong influence). Check that the model looks at the anatomy, not at labels, "
        "borders or devices. p is the probability the model gave to its prediction."))
    sites = _sites(report)
    sites += [s for s in dict.fromkeys(e.get("site") for e in examples) if s not in sites]
    classes = _classes(report)
    for site in sites:
        here = [e for e in examples if e.get("site") == site]
        named = dict.fromkeys(e.get("true") for e in here)
        order = classes + [c for c in named if c not in classes]
        for true in order:
            pictures = tuple(Picture(str(e.get("file") or ""), _gradcam_caption(e))
                             for e in here if e.get("true") == true)
            if pictures:
                blocks.append(Gallery(f"Site {site}, true class {true}", pictures))
    return blocks


def _gradcam_caption(example: dict) -> str:
    verdict = "correct" if example.get("correct") else "wrong"
    probability = example.get("probability")
    p = MISSING if probability is None else f"{probability:.2f}"
    return (f"true {example.get('true')}, predicted {example.get('predicted')} ({verdict}), "
            f"p={p}")


# --- section 11: model card ----------------------------------------------------------------------

def _model_card_section(report: dict) -> list[Block]:
    card = report.get("model_card")
    blocks: list[Block] = [Heading(2, "11. Model card")]
    if not card:
        return [*blocks, Paragraph("No model card in this report.")]
    config = report.get("config") or {}
    size = card.get("input_size")
    trainable, total = card.get("trainable_params"), card.get("total_params")
    share = (f" ({100 * trainable / total:.1f}% trainable)"
             if trainable is not None and total else "")
    rows = [
        ("Backbone", card.get("backbone")), ("Pretrained weights", card.get("weights")),
        ("Weights source", card.get("weights_source")), ("Frozen stages", card.get("freeze")),
        ("Input size", f"{size} × {size} pixels" if size else None),
        ("Normalization mean", _triple(card.get("mean"))),
        ("Normalization std", _triple(card.get("std"))),
        ("Contrast equalization", card.get("equalize")),
        ("Trainable parameters", _count_text(trainable)),
        ("Total parameters", None if total is None else _count_text(total) + share),
        ("Federated rounds", (config.get("federation") or {}).get("rounds")),
        ("Local epochs per round", (config.get("train") or {}).get("local_epochs")),
    ]
    versions = card.get("versions") or {}
    card_tables = [Table(("Field", "Value"),
                         tuple((k, MISSING if v is None else str(v)) for k, v in rows))]
    if versions:
        card_tables.append(Table(("Package", "Version"),
                                 tuple((k, str(v)) for k, v in versions.items()),
                                 "Software versions"))
    if card.get("privacy"):
        blocks.append(Paragraph(card["privacy"]))
    return [*blocks, Folded("The model, its inputs and the software that trained it",
                            tuple(card_tables))]


def _triple(values: Sequence[float] | None) -> str | None:
    return None if values is None else ", ".join(format_number(v) for v in values)


def _count_text(count: int | None) -> str | None:
    return None if count is None else f"{count:,}"


# --- section 12: citation ------------------------------------------------------------------------

def _citation_section(report: dict) -> list[Block]:
    citation = (report.get("dataset") or {}).get("citation")
    text = (f"If you use these results, cite the dataset: {citation}" if citation
            else "No citation is recorded for this dataset.")
    return [Heading(2, "12. Data citation"), Paragraph(text)]


SECTIONS = (_summary_section, _overview_section, _detail_section, _roc_section,
            _learning_section, _statistics_section, _efficiency_section, _sites_section,
            _cost_section, _gradcam_section, _model_card_section, _citation_section)


def _document(report: dict) -> list[Block]:
    return [block for section in SECTIONS for block in section(report)]


# --- HTML ----------------------------------------------------------------------------------------

def _html_block(block: Block, *, run_dir: Path) -> str:
    escape = html.escape
    if isinstance(block, Heading):
        return f"<h{block.level}>{escape(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        return f"<p>{escape(block.text)}</p>"
    if isinstance(block, Items):
        return "<ul>" + "".join(f"<li>{escape(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Plot):
        return _html_figure(_png(block.draw), block.caption)
    if isinstance(block, Folded):
        inner = "\n".join(_html_block(b, run_dir=run_dir) for b in block.blocks)
        return f"<details><summary>{escape(block.summary)}</summary>\n{inner}\n</details>"
    return _html_gallery(block, run_dir=run_dir)


def _html_table(table: Table) -> str:
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in table.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                   for row in table.rows)
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_figure(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    text = html.escape(caption)
    return (f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{text}\">"
            f"<figcaption>{text}</figcaption></figure>")


def _html_gallery(gallery: Gallery, *, run_dir: Path) -> str:
    items = []
    for picture in gallery.pictures:
        png, problem = _read_png(run_dir, picture.file)
        if png is None:
            note = html.escape(f"{picture.caption} — image {picture.file} {problem}")
            items.append(f"<figure><p class=\"note\">{note}</p></figure>")
        else:
            items.append(_html_figure(png, picture.caption))
    return (f"<h3>{html.escape(gallery.title)}</h3>"
            f"<div class=\"gallery\">{''.join(items)}</div>")


def _read_png(run_dir: Path, file: str) -> tuple[bytes | None, str]:
    """The PNG bytes, or None and why not. Only files inside run_dir are read, so a report
    cannot make the page embed an arbitrary file from the machine."""
    root = run_dir.resolve()
    path = (root / file).resolve()
    if not file or not path.is_relative_to(root):
        return None, "is outside the run directory"
    if not path.is_file():
        return None, "is missing"
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        return None, "is not a PNG file"
    return data, ""


# --- Markdown ------------------------------------------------------------------------------------

def _md_text(text: str) -> str:
    # Markdown viewers render raw HTML and inline markup, so report strings are neutralised.
    escaped = html.escape(" ".join(str(text).split()), quote=False)
    for mark in ("\\", "`", "*", "_", "[", "]", "|"):
        escaped = escaped.replace(mark, "\\" + mark)
    return escaped


def _markdown_block(block: Block) -> str:
    if isinstance(block, Heading):
        return "#" * block.level + " " + _md_text(block.text)
    if isinstance(block, Paragraph):
        return _md_text(block.text)
    if isinstance(block, Items):
        return "\n".join(f"- {_md_text(item)}" for item in block.items)
    if isinstance(block, Table):
        return _markdown_table(block)
    if isinstance(block, Plot):
        note = f"*Plot: {_md_text(block.caption)} (shown in report.html).*"
        return "\n\n".join([note, *(_markdown_table(t) for t in block.fallback)])
    if isinstance(block, Folded):
        return "\n\n".join(_markdown_block(b) for b in block.blocks)
    lines = [f"**{_md_text(block.title)}**", ""]
    lines += [f"- {_md_text(p.caption)} (image file {_md_text(p.file)})" for p in block.pictures]
    return "\n".join(lines)


def _markdown_table(table: Table) -> str:
    lines = [f"**{_md_text(table.caption)}**", ""] if table.caption else []
    lines.append("| " + " | ".join(_md_text(c) for c in table.header) + " |")
    lines.append("|" + "---|" * len(table.header))
    lines += ["| " + " | ".join(_md_text(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)
