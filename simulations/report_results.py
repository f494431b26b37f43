"""The comparison report's sections 1 to 7: what the models scored, from the summary to the
data-efficiency curve. Each section turns the report dict into document blocks."""

from __future__ import annotations

import math

from medfed.common.document import Block, Folded, Heading, Items, Paragraph, Plot, Table
from medfed.common.metrics import MISSING, PER_CLASS_SCALARS, format_number
from medfed.common.metrics import SCALARS as METRICS
from medfed.simulations.report_fields import (
    GLOBAL, all_runs, class_names, first_run, global_auc, mode_entry, mode_names, results_at,
    site_names, summary_cell,
)
from medfed.simulations.report_plots import (
    confusion_drawer, efficiency_drawer, global_curves, roc_drawer, site_curves,
)
from medfed.simulations.report_text import (
    METRIC_HEADERS, attack_text, listing, mean_std_text, mode_meaning, p_text, percent, plural,
    sentence, site_label, where, with_ci,
)
from medfed.simulations.statistics import mean_std


# --- section 1: summary ----------------------------------------------------------------

def _summary_section(report: dict) -> list[Block]:
    dataset = report.get("dataset") or {}
    partition = report.get("partition") or {}
    modes, sites, classes = mode_names(report), site_names(report), class_names(report)
    runs = all_runs(report)
    seeds = report.get("seeds") or []
    fractions = report.get("train_fractions") or []
    text = [
        f"This report compares {len(modes)} ways of training an image classifier "
        f"({listing(modes)}) on the {dataset.get('name') or 'unnamed'} dataset "
        f"({plural(len(classes), 'class')}: {listing(classes)}).",
        f"The images were divided among {plural(len(sites), 'simulated hospital site')} "
        f"({listing(sites) or 'none named'}) "
        f"with the {partition.get('scheme') or 'unstated'} partition"
        + (f" (alpha = {partition['alpha']:g})" if partition.get("alpha") is not None else "")
        + "; every mode was trained on the same site splits and tested on each site's own test "
          "images and on a shared global test set.",
    ]
    if partition.get("site_split") or partition.get("global_test"):
        text.append(f"Site splits: {partition.get('site_split') or MISSING}; "
                    f"global test set: {partition.get('global_test') or MISSING}.")
    design = f"seeds {listing([str(s) for s in seeds])}" if seeds else "no seeds recorded"
    if report.get("folds"):
        design += f", {report['folds']} cross-validation folds"
    if len(fractions) > 1:
        design += f", training fractions {listing([percent(f) for f in fractions])}"
    text.append(f"Runs: {design} ({plural(len(runs), 'run')} in total).")
    if report.get("budget"):
        text.append(sentence(report["budget"]))
    glossary = tuple(f"{mode}: {mode_meaning(mode)}" for mode in modes)
    attack = []
    if report.get("attack"):
        attack = [Paragraph(
            f"Simulated attack: {attack_text(report['attack'])}. Strategy: "
            f"{((report.get('config') or {}).get('federation') or {}).get('strategy') or MISSING}. "
            "Results at the attacking sites are reported but flagged \"(attacker)\": they are "
            "not evidence about the method. The attack changes only what the attackers train on or "
            "send back; every test set keeps its true labels.")]
    return [Heading(2, "1. Summary"), Paragraph(" ".join(text)),
            *attack, Paragraph("Training modes:"), Items(glossary)]


# --- section 2: mode x site table ----------------------------------------------------------------

def _overview_section(report: dict) -> list[Block]:
    modes, sites, summary = mode_names(report), site_names(report), report.get("summary") or {}
    columns = [*sites, GLOBAL]
    counts = sorted({(summary_cell(summary, m, s, metric="auc") or {}).get("n", 0)
                     for m in modes for s in columns} - {0})
    over = (plural(counts[0], "run") if len(counts) == 1
            else f"{counts[0]}–{counts[-1]} runs" if counts else "the runs")
    blocks: list[Block] = [Heading(2, "2. Test results by mode and site"), Paragraph(
        f"Each cell is the mean ± standard deviation over {over} of the model tested on that "
        "site's test images; \"global\" is the shared global test set. For local training, "
        "\"global\" is the best single-site model on the global test set.")]
    for metric, caption in (("auc", "Test AUC (area under the ROC curve)"),
                            ("accuracy", "Test accuracy")):
        rows = tuple((mode, *(mean_std_text(summary_cell(summary, mode, s, metric=metric))
                              for s in columns))
                     for mode in modes)
        blocks.append(Table(("Mode", *(site_label(report, c) for c in columns)), rows, caption))
    return blocks


# --- section 3: first-run detail -----------------------------------------------------------------

def _detail_section(report: dict) -> list[Block]:
    run, modes, classes = first_run(report), mode_names(report), class_names(report)
    fold = f", fold {run['fold']}" if run.get("fold") is not None else ""
    fraction = f", training fraction {percent(run['fraction'])}" if "fraction" in run else ""
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
    for site in [*site_names(report), GLOBAL]:
        found = results_at(run, modes, site)
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
    heading = "Global test set" if site == GLOBAL else f"Site {site_label(report, site)}"
    rows = tuple(
        (label, *(result["not_estimable"] if result.get("not_estimable") and m in PER_CLASS_SCALARS
                  else with_ci((result.get("metrics") or {}).get(m), (result.get("ci") or {}).get(m))
                  for m in METRICS), str((result.get("metrics") or {}).get("n", MISSING)))
        for label, result in found)
    blocks: list[Block] = [
        Table(("Model", *(METRIC_HEADERS[m] for m in METRICS), "Images"), rows,
              f"Test metrics on {where(site)} with 95% confidence intervals"),
    ]
    operating = _operating_table(found, site=site)
    if operating:
        blocks.append(operating)
    confusion = _confusion_plot(site, found, classes=class_names(report))
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
        f"Operating points on {where(site)}: the default threshold 0.5 and the threshold "
        "chosen on validation data to maximise sensitivity + specificity (Youden)")


def _confusion_plot(site: str, found: list[tuple[str, dict]], *, classes: list[str]
                    ) -> Plot | None:
    matrices = [(label, (result.get("metrics") or {}).get("confusion_matrix"))
                for label, result in found]
    matrices = [(label, m) for label, m in matrices if m]
    if not matrices:
        return None
    names = classes or [str(i) for i in range(len(matrices[0][1]))]
    fallback = tuple(
        Table(("true \\ predicted", *names),
              tuple((names[i] if i < len(names) else str(i), *map(str, row))
                    for i, row in enumerate(matrix)),
              f"Confusion matrix, {label}, {where(site)}")
        for label, matrix in matrices)
    return Plot(f"confusion-{site}", f"Confusion matrices on {where(site)} (rows: true "
                "class, columns: predicted class)", confusion_drawer(matrices, names), fallback)


# --- section 4: ROC curves -----------------------------------------------------------------------

def _roc_section(report: dict) -> list[Block]:
    run, modes = first_run(report), mode_names(report)
    blocks: list[Block] = [Heading(2, "4. ROC curves"), Paragraph(
        "Each curve shows, for every possible threshold, the share of positive images found "
        "(sensitivity) against the share of negative images wrongly flagged (1 − specificity), "
        "for the first run. The diagonal is chance.")]
    plots = []
    for site in [GLOBAL, *site_names(report)]:
        curves = [(label, r) for label, r in results_at(run, modes, site) if r.get("roc")]
        if curves:
            plots.append(Plot(f"roc-{site}", f"ROC curves on {where(site)}",
                              roc_drawer(report, curves, title=where(site))))
    if not plots:
        classes = class_names(report)
        reason = (f"this dataset has {len(classes)} classes and ROC curves are drawn for "
                  "two-class tasks only" if len(classes) != 2
                  else "the report holds no ROC curve data")
        return [*blocks, Paragraph(f"No ROC curves: {reason}.")]
    return blocks + plots


# --- section 5: learning curves ------------------------------------------------------------------

def _learning_section(report: dict) -> list[Block]:
    run = first_run(report)
    histories = {m: mode_entry(run, m)["history"] for m in mode_names(report)
                 if mode_entry(run, m).get("history")}
    blocks: list[Block] = [Heading(2, "5. Learning curves")]
    if not histories:
        return [*blocks, Paragraph("No mode recorded a training history in this report.")]
    blocks.append(Paragraph(
        "How the models improved during training in the first run: per round for federated "
        "modes, per epoch for centralized training. Global test AUC should rise and validation "
        "loss fall; a validation loss that rises again means over-fitting."))
    sites = site_names(report)
    blocks.append(Plot("learning-global", "Global test AUC and validation loss per round",
                       global_curves(report, histories), (_history_table(histories),)))
    blocks.append(Plot("learning-sites", "Validation AUC per site and round",
                       site_curves(histories, sites=sites),
                       (_site_history_table(histories, sites=sites),)))
    return blocks


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
            p_text(comparison.get("wilcoxon_p")), p_text(comparison.get("ttest_p")),
            format_number(comparison.get("cohens_dz")), sentence(comparison.get("sentence") or ""))


# --- section 7: data efficiency ------------------------------------------------------------------

def _efficiency_section(report: dict) -> list[Block]:
    fractions = sorted(report.get("train_fractions") or [])
    blocks: list[Block] = [Heading(2, "7. Data efficiency")]
    if len(fractions) <= 1:
        used = percent(fractions[0]) if fractions else "100%"
        return [*blocks, Paragraph(f"All runs used the same share of the training images "
                                   f"({used}), so there is no data-efficiency curve.")]
    cells = _efficiency_cells(report, fractions)
    blocks.append(Paragraph(
        "Global test AUC when each site trains on only part of its training images (mean ± "
        "standard deviation over runs). A flat curve means the mode needs little data. For local "
        "training, the best single-site model is shown."))
    rows = tuple((mode, *(mean_std_text(cells[mode][f]) for f in fractions)) for mode in cells)
    table = Table(("Mode", *(percent(f) for f in fractions)), rows,
                  "Global test AUC by share of training images used")
    return [*blocks, Plot("data-efficiency", "Global test AUC against share of training images",
                          efficiency_drawer(report, cells, fractions)), table]


def _efficiency_cells(report: dict, fractions: list[float]) -> dict[str, dict[float, dict]]:
    cells = {}
    for mode in mode_names(report):
        by_fraction = {f: [] for f in fractions}
        for run in all_runs(report):
            if run.get("fraction") in by_fraction:
                by_fraction[run["fraction"]].append(global_auc(mode_entry(run, mode)))
        cells[mode] = {f: mean_std(values) for f, values in by_fraction.items()}
    return cells


RESULT_SECTIONS = (_summary_section, _overview_section, _detail_section, _roc_section,
                   _learning_section, _statistics_section, _efficiency_section)
