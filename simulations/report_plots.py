"""The comparison report's plots, drawn with matplotlib.

Each drawer returns the function a `Plot` block calls to draw its figure, so a figure is only
drawn when a rendering needs it. A mode keeps its colour in every plot.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from medfed.common.dataset import SPLITS
from medfed.common.document import DPI
from medfed.common.metrics import format_number
from medfed.simulations.report_fields import mode_names
from medfed.simulations.report_text import percent


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
    modes = mode_names(report)
    palette = matplotlib.colormaps["tab10"].colors
    index = modes.index(label) if label in modes else len(modes) + extra
    return palette[index % len(palette)]


def _integer_rounds(*axes) -> None:
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _series(values: Sequence[float | None]) -> np.ndarray:
    # None becomes NaN, which matplotlib draws as a gap instead of failing.
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def confusion_drawer(matrices: list[tuple[str, list[list[int]]]], names: list[str]
                     ) -> Callable[[], Figure]:
    def draw() -> Figure:
        figure, axes = _grid(len(matrices), columns=4, panel=(2.6, 2.5))
        for ax, (label, matrix) in zip(axes, matrices):
            _heatmap(ax, np.array(matrix), names=names, title=label)
        return figure
    return draw


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


def roc_drawer(report: dict, curves: list[tuple[str, dict]], *, title: str
               ) -> Callable[[], Figure]:
    def draw() -> Figure:
        figure = _figure(5.2, 4.2)
        ax = figure.add_subplot()
        ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
        others = [label for label, _ in curves if label not in mode_names(report)]
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


def global_curves(report: dict, histories: dict[str, list[dict]]) -> Callable[[], Figure]:
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


def site_curves(histories: dict[str, list[dict]], *, sites: list[str]) -> Callable[[], Figure]:
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


def efficiency_drawer(report: dict, cells: dict[str, dict[float, dict]],
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
        ax.set_xticks(fractions, [percent(f) for f in fractions])
        ax.minorticks_off()
        ax.set(xlabel="share of training images used", ylabel="global test AUC",
               title="Data efficiency")
        ax.legend()
        return figure
    return draw


def histogram_drawer(sites: dict[str, dict], names: list[str]) -> Callable[[], Figure]:
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


def cost_drawer(report: dict, costs: dict[str, tuple]) -> Callable[[], Figure]:
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


def forest_drawer(report: dict, rows: list[tuple[str, str, list[tuple[float, tuple | None]]]]
                  ) -> Callable[[], Figure]:
    """Global test AUC per mode, one row of (mode, label, points) each: every run as a point with
    its 95% interval and, over several runs, their mean as a black bar; a row without points says
    its AUC is not estimable."""
    def draw() -> Figure:
        figure = _figure(9.6, 0.7 + 0.3 * max(len(rows), 1))
        ax = figure.add_subplot()
        lows = [ci[0] for _, _, points in rows for _, ci in points if ci]
        left = min([0.5, *lows]) - 0.02
        ax.axvline(0.5, color="0.75", linestyle=":", linewidth=1)
        for row, (mode, _, points) in enumerate(rows):
            color = _color(report, mode)
            if not points:
                ax.text(left + 0.01, row, "not estimable", va="center", color="0.35")
            offsets = np.linspace(-0.22, 0.22, len(points)) if len(points) > 1 else [0.0]
            for offset, (auc, ci) in zip(offsets, points):
                if ci:
                    ax.plot(ci, [row + offset] * 2, color=color, linewidth=1.2, alpha=0.8)
                ax.plot(auc, row + offset, "o", color=color, markersize=4.5)
            aucs = [auc for auc, _ in points]
            if len(aucs) > 1:
                ax.plot([np.mean(aucs)] * 2, [row - 0.32, row + 0.32], color="black", linewidth=2)
        ax.set_yticks(range(len(rows)), [label for _, label, _ in rows])
        ax.tick_params(labelsize=8)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_xlim(left, 1.0)
        ax.set_xlabel("global test AUC (dotted line: chance)")
        ax.grid(axis="x", color="0.9", linewidth=0.8)
        ax.set_axisbelow(True)
        return figure
    return draw
