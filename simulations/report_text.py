"""How the comparison report words its numbers and names: mean ± standard deviation, confidence
intervals, p-values, sizes, shares, lists, plurals, and what each training mode means."""

from __future__ import annotations

from collections.abc import Sequence

from medfed.common.metrics import MISSING, format_number
from medfed.simulations.report_fields import GLOBAL, attackers
from medfed.simulations.statistics import format_p

METRIC_HEADERS = {
    "accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy", "precision": "Precision",
    "recall": "Sensitivity", "specificity": "Specificity", "f1": "F1", "auc": "AUC",
}
MODE_MEANINGS = {
    "federated": "one shared model trained across the sites; images never leave their site",
    "centralized": "one model trained on all sites' images pooled in one place (the upper "
                   "reference that federated learning tries to reach)",
    "local": "each site trains its own model on its own images only",
    "scratch": "federated training starting from random weights instead of ImageNet weights",
}
CLASSICAL_MODELS = {"svm": "support vector machine", "rf": "random forest"}
CLASSICAL_FEATURES = {"pixels": "raw pixel values", "cnn": "features from the pretrained CNN"}


def mean_std_text(cell: dict | None) -> str:
    if not cell or cell.get("mean") is None:
        return MISSING
    if cell.get("std") is None:
        return format_number(cell["mean"])
    return f"{format_number(cell['mean'])} ± {format_number(cell['std'])}"


def with_ci(value: float | None, ci: Sequence[float | None] | None) -> str:
    if value is None:
        return MISSING
    if not ci or ci[0] is None or ci[1] is None:
        return format_number(value)
    if ci[0] == ci[1]:
        # Every bootstrap resample agreed (e.g. all 9 images right): the percentile interval has
        # no width, which says nothing about certainty.
        return f"{format_number(value)} (interval not estimable)"
    return f"{format_number(value)} ({format_number(ci[0])}–{format_number(ci[1])})"


def p_text(p: float | None) -> str:
    return format_p(p).removeprefix("= ")


def megabytes(count: float | None) -> str:
    return MISSING if count is None else f"{count / 1e6:.3f} MB"


def percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def listing(words: Sequence[str]) -> str:
    words = [str(w) for w in words]
    if len(words) <= 2:
        return " and ".join(words)
    return ", ".join(words[:-1]) + ", and " + words[-1]


def plural(count: int, noun: str) -> str:
    ending = "es" if noun.endswith("s") else "s"
    return f"{count} {noun}{'' if count == 1 else ending}"


def sentence(text: str) -> str:
    text = str(text).strip()
    return text if not text or text.endswith((".", "!", "?")) else text + "."


def where(site: str) -> str:
    return "the global test set" if site == GLOBAL else f"site {site}"


def site_label(report: dict, site: str) -> str:
    """A site's name, flagged when it was a simulated attacker."""
    return f"{site} (attacker)" if site in attackers(report) else site


def attack_text(attack: dict) -> str:
    sites = list(attack.get("sites") or [])
    return (f"{attack.get('kind')} by {plural(len(sites), 'site')} ({listing(sites)}): "
            f"{attack.get('effect') or MISSING}")


def mode_meaning(mode: str) -> str:
    if mode in MODE_MEANINGS:
        return MODE_MEANINGS[mode]
    parts = mode.split("-")
    if len(parts) == 3 and parts[0] == "classical":
        model = CLASSICAL_MODELS.get(parts[1], parts[1])
        features = CLASSICAL_FEATURES.get(parts[2], parts[2])
        return f"a {model} (classical machine learning) trained on {features} of the pooled images"
    return "no description available"
