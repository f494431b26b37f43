"""The comparison report's first screen: a verdict on each question the comparison answers, with
its effect size and p-value, then the global test AUC of every mode as a forest plot.

Verdicts read the paired tests already in the report (`statistics`, from
`simulations.statistics.paired_comparison`); nothing is tested again here. The Wilcoxon
signed-rank p-value decides, at 0.05: it assumes nothing about the shape of the differences,
which a handful of sites and seeds cannot check. A verdict the data cannot give (a mode not run,
too few pairs for the test to reach 0.05) says so instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass

from medfed.common.document import Block, Heading, Items, Paragraph, Plot, Table
from medfed.common.metrics import MISSING
from medfed.simulations.report_fields import (
    final_runs, global_result, mode_entry, mode_names, report_title,
)
from medfed.simulations.report_plots import forest_drawer
from medfed.simulations.report_text import mean_std_text, plural, with_ci
from medfed.simulations.statistics import WILCOXON_MIN_FOR_005, format_p, mean_std

LEVEL = 0.05
FEDERATED = "federated"


@dataclass(frozen=True)
class _Question:
    """One comparison of the report's statistics (label_a, label_b) put as a question."""
    b: str
    lead: str
    better: str           # the verdict when federated is significantly better
    worse: str            # ... and when it is significantly worse
    needs: str            # the mode whose absence leaves the question open
    global_only: bool = False


QUESTIONS = (
    _Question("local", "Federated vs each site training alone", "yes, federated is better",
              "no, the sites do better alone", "local"),
    _Question("best local site", "Federated vs the best single site's model (global test set)",
              "yes, federated is better", "no, the best site's own model is better", "local",
              global_only=True),
    _Question("centralized", "Federated vs pooled (centralized) training",
              "federated is better than pooling", "federated falls short of pooling",
              "centralized"),
    _Question("scratch", "Transfer learning (ImageNet weights) vs training from scratch",
              "yes, the pretrained weights help", "no, training from scratch is better",
              "scratch"),
)


def answer_section(report: dict) -> list[Block]:
    modes = mode_names(report)
    runs = final_runs(report)
    reading = ("Each verdict is a paired Wilcoxon signed-rank test on test AUC at p < 0.05 "
               "(details in section 6). d_z is the effect size: the mean difference over its "
               "standard deviation (0.2 small, 0.5 medium, 0.8 large). No significant difference "
               "does not prove two modes equal.")
    if len(runs) == 1:
        reading += (" One seed: each verdict rests on one training run per mode; repeat with "
                    "--seeds 0,1,2 before relying on it.")
    blocks: list[Block] = [Heading(1, report_title(report)), Heading(2, "The answer in brief")]
    if FEDERATED not in modes:
        return [*blocks, Paragraph("Federated training was not run (add it with --compare), so "
                                   "there is no verdict on it."), *_forest(report, runs)]
    comparisons = {(c.get("label_a"), c.get("label_b")): c for c in report.get("statistics") or []}
    items = [_answer(q, comparisons.get((FEDERATED, q.b)), modes=modes, runs=len(runs))
             for q in QUESTIONS]
    items.append(_classical_answer(modes, comparisons))
    return [*blocks, Items(tuple(items)), *_forest(report, runs), Paragraph(reading)]


def _answer(question: _Question, comparison: dict | None, *, modes: list[str], runs: int
            ) -> tuple[str, str]:
    if question.needs not in modes:
        return (f"{question.lead}: cannot say.",
                f"{question.needs} was not run (--compare all runs every mode).")
    if comparison is None:
        return f"{question.lead}: cannot say.", "The report holds no test of this comparison."
    n = comparison.get("n") or 0
    unit = (plural(n, "seed") if question.global_only else f"{n} site test sets" if runs == 1
            else f"{n} site × seed pairs")
    numbers = _numbers(comparison, of=unit)
    undecided = _undecided(comparison)
    if undecided:
        return f"{question.lead}: cannot say yet.", f"{numbers}. {undecided}"
    significant = comparison["wilcoxon_p"] < LEVEL
    verdict = (question.better if significant and comparison["mean_difference"] > 0
               else question.worse if significant else "no significant difference")
    return f"{question.lead}: {verdict}.", f"{numbers}."


def _classical_answer(modes: list[str], comparisons: dict) -> tuple[str, str]:
    lead = "Transfer learning (federated) vs classical machine learning"
    baselines = [m for m in modes if m.startswith("classical-")]
    if not baselines:
        return (f"{lead}: cannot say.",
                "No classical baseline was run (--compare all runs every mode).")
    found = [(m, comparisons.get((FEDERATED, m))) for m in baselines]
    decided = [(m, c) for m, c in found if c and not _undecided(c)]
    parts = [f"{m}: {_short_numbers(c)}" if c else f"{m}: no test" for m, c in found]
    if not decided:
        reasons = sorted({_undecided(c) for _, c in found if c}) or ["No test in the report."]
        return f"{lead}: cannot say yet.", f"{'; '.join(parts)}. {' '.join(reasons)}"
    better = [m for m, c in decided if c["wilcoxon_p"] < LEVEL and c["mean_difference"] > 0]
    worse = [m for m, c in decided if c["wilcoxon_p"] < LEVEL and c["mean_difference"] < 0]
    verdict = (f"federated is better than {len(better)} of {len(baselines)}" if better
               else "no baseline differs significantly")
    if worse:
        verdict += f", worse than {len(worse)}"
    return f"{lead}: {verdict}.", "; ".join(parts) + "."


def _undecided(comparison: dict) -> str:
    """Why the comparison's test cannot give a verdict, or "" when it can."""
    differing = (comparison.get("n") or 0) - (comparison.get("ties") or 0)
    if comparison.get("wilcoxon_p") is None:
        note = comparison.get("note") or "no test was possible"
        return note[:1].upper() + note[1:] + "."
    if differing < WILCOXON_MIN_FOR_005:
        return (f"Too few pairs for the test to reach p < {LEVEL} ({differing} differ, "
                f"{WILCOXON_MIN_FOR_005} needed): add seeds or sites.")
    return ""


def _numbers(comparison: dict, *, of: str) -> str:
    dropped = comparison.get("n_dropped") or 0
    left_out = f" ({dropped} left out: AUC not estimable)" if dropped else ""
    return (f"Federated higher on {comparison.get('wins', MISSING)} of {of}{left_out}; mean AUC "
            f"difference {_short_numbers(comparison)}")


def _short_numbers(comparison: dict) -> str:
    difference = comparison.get("mean_difference")
    dz = comparison.get("cohens_dz")
    p = format_p(comparison.get("wilcoxon_p"))
    return (f"{MISSING if difference is None else f'{difference:+.3f}'} (d_z "
            f"{MISSING if dz is None else f'{dz:.2f}'}, p {p})")


# --- the forest plot -----------------------------------------------------------------------------

def _forest(report: dict, runs: list[dict]) -> list[Block]:
    rows, table = [], []
    for mode in mode_names(report):
        points, aucs = [], []
        for run in runs:
            result = global_result(mode_entry(run, mode)) or {}
            auc = (result.get("metrics") or {}).get("auc")
            ci = (result.get("ci") or {}).get("auc")
            table.append((mode, _run_name(run), with_ci(auc, ci)))
            if auc is not None:
                # A zero-width interval (every resample agreed) is not drawn: it is no interval.
                drawn = ci and None not in ci and ci[0] != ci[1]
                points.append((auc, tuple(ci) if drawn else None))
                aucs.append(auc)
        summary = (MISSING if not points else with_ci(*points[0]) if len(points) == 1
                   else mean_std_text(mean_std(aucs)))
        rows.append((mode, f"{mode}  {summary}", points))
    if not rows:
        return []
    caption = ("Global test AUC per mode, every run (seed) a point with its 95% bootstrap "
               "interval" + ("; the black bar is the mean over runs" if len(runs) > 1 else "")
               + ". local: the best single site's model. Beside each mode: "
               + ("mean ± standard deviation over runs." if len(runs) > 1
                  else "AUC (95% interval)."))
    return [Plot("forest-global-auc", caption, forest_drawer(report, rows),
                 (Table(("Mode", "Run", "Global test AUC (95% CI)"), tuple(table)),))]


def _run_name(run: dict) -> str:
    fold = f", fold {run['fold']}" if run.get("fold") is not None else ""
    return f"seed {run.get('seed', MISSING)}{fold}"
