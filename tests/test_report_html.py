"""report.html and report.md rendered from a synthetic comparison report."""

from __future__ import annotations

import base64
import copy
import html
import io
import re

import numpy as np
import pytest
from PIL import Image

from medfed.simulations.evidence import _Judge
from medfed.simulations.report import figures, render_html, render_markdown

SITES = ("north", "south<script>alert(1)</script>")
MODES = ("federated", "centralized", "local", "scratch", "classical-svm-pixels")
CLASSES = ("normal", "pneumonia")
SENTENCE = "federated beats local at 4 of 4 site x seed pairs (mean AUC +0.052; Wilcoxon p = 0.12)"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _result(rng: np.random.Generator, *, classes: int = 2) -> dict:
    values = {m: float(rng.uniform(0.6, 0.95)) for m in
              ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "auc")}
    confusion = rng.integers(0, 40, size=(classes, classes)).tolist()
    binary = classes == 2
    fpr = np.sort(np.concatenate([[0.0, 1.0], rng.uniform(0, 1, 8)]))
    return {
        "metrics": {**values, "confusion_matrix": confusion, "n": int(np.sum(confusion))},
        "ci": {m: [v - 0.05, min(v + 0.04, 1.0)] for m, v in values.items()},
        "operating_points": {
            "youden_threshold": float(rng.uniform(0.3, 0.7)),
            "at_0.5": {"sensitivity": 0.8, "specificity": 0.7},
            "at_youden": {"sensitivity": 0.85, "specificity": 0.75},
        } if binary else None,
        "roc": {"fpr": fpr.tolist(), "tpr": np.sqrt(fpr).tolist()} if binary else None,
    }


def _history(rounds: int) -> list[dict]:
    return [{"round": r, "val_loss": 0.7 - 0.1 * r, "global_auc": 0.7 + 0.05 * r,
             "sites": {s: {"val_auc": 0.65 + 0.06 * r} for s in SITES}}
            for r in range(1, rounds + 1)]


def _mode_entry(mode: str, rng: np.random.Generator, *, classes: int, history: bool) -> dict:
    entry = {"wall_s": float(rng.uniform(10, 100)),
             "bytes": ({"up": 12_345_678, "down": 23_456_789}
                       if mode in ("federated", "scratch") else None),
             "history": (_history(3) if history and mode in ("federated", "scratch", "centralized")
                         else None),
             "results": {s: _result(rng, classes=classes) for s in SITES},
             "local_on_global": None}
    if mode == "local":
        entry["local_on_global"] = {s: _result(rng, classes=classes) for s in SITES}
    else:
        entry["results"]["global"] = _result(rng, classes=classes)
    return entry


def _report(*, seeds=(0, 1), fractions=(0.5, 1.0), classes=CLASSES, history=True,
            gradcam=()) -> dict:
    rng = np.random.default_rng(0)
    runs = [{"seed": seed, "fold": None, "fraction": fraction,
             "modes": {m: _mode_entry(m, rng, classes=len(classes), history=history)
                       for m in MODES}}
            for fraction in fractions for seed in seeds]
    first = runs[0]["modes"]["federated"]["results"]["global"]
    first["metrics"]["auc"], first["ci"]["auc"] = 0.912, [0.871, 0.948]
    if first["operating_points"]:
        first["operating_points"].update(
            youden_threshold=0.437, at_youden={"sensitivity": 0.881, "specificity": 0.902})
    summary = {m: {s: {metric: {"mean": 0.8 + 0.01 * i, "std": 0.02, "n": len(runs)}
                       for metric in ("accuracy", "auc")}
                   for s in (*SITES, "global")}
               for i, m in enumerate(MODES)}
    return {
        "kind": "medfed-comparison",
        "config": {"federation": {"rounds": 3}, "train": {"local_epochs": 1}},
        "dataset": {"name": "pneumoniamnist", "classes": list(classes),
                    "citation": "Yang J. et al. MedMNIST v2. Sci Data 2023. https://medmnist.com"},
        "partition": {"scheme": "dirichlet", "alpha": 0.5, "site_split": "80/10/10",
                      "global_test": "official MedMNIST test split"},
        "modes": list(MODES), "seeds": list(seeds), "folds": None,
        "train_fractions": list(fractions),
        "budget": "3 rounds x 1 local epoch: every training image seen 3 times in every mode",
        "model_card": {"backbone": "resnet18", "weights": "IMAGENET1K_V1",
                       "weights_source": "torchvision", "freeze": "stem,layer1",
                       "input_size": 224, "mean": [0.485, 0.456, 0.406],
                       "std": [0.229, 0.224, 0.225], "equalize": "none",
                       "trainable_params": 11_000_000, "total_params": 11_689_512,
                       "versions": {"torch": "2.14.1", "flwr": "1.42.0"}},
        "sites": {s: {"n": {"train": 100 + i, "val": 20, "test": 30},
                      "label_histogram": {"train": [40, 60 + i], "val": [8, 12], "test": [10, 20]}
                      if len(classes) == 2 else
                      {"train": [30, 30, 40 + i], "val": [6, 6, 8], "test": [10, 10, 10]}}
                  for i, s in enumerate(SITES)},
        "runs": runs,
        "summary": summary,
        "statistics": [{"label_a": "federated", "label_b": "local", "metric": "auc", "n": 4,
                        "mean_a": 0.9, "mean_b": 0.848, "mean_difference": 0.052,
                        "wins": 4, "ties": 0, "losses": 0, "wilcoxon_p": 0.125,
                        "ttest_p": 0.0004, "cohens_dz": 2.31, "rank_biserial": 1.0,
                        "sentence": SENTENCE}],
        "gradcam": list(gradcam),
        "timing": {"wall_s": 812.5},
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("run")
    (directory / "gradcam").mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(directory / "gradcam" / "north-0.png")
    (directory.parent / "secret.png").write_bytes(PNG_SIGNATURE + b"not for the page")
    return directory


GRADCAM = (
    {"site": "north", "true": "pneumonia", "predicted": "pneumonia", "probability": 0.8734,
     "correct": True, "file": "gradcam/north-0.png"},
    {"site": SITES[1], "true": "normal", "predicted": "pneumonia", "probability": 0.61,
     "correct": False, "file": "gradcam/missing.png"},
    {"site": "north", "true": "normal", "predicted": "normal", "probability": 0.9,
     "correct": True, "file": "../secret.png"},
)


@pytest.fixture(scope="module")
def report():
    return _report(gradcam=GRADCAM)


@pytest.fixture(scope="module")
def page(report, run_dir):
    return render_html(report, run_dir=run_dir)


def test_html_is_self_contained(page):
    sources = re.findall(r"\bsrc=\"([^\"]*)\"", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"\b(src|href)=\"?https?:", page)
    assert "<link" not in page and "<script" not in page


def test_html_names_every_site_and_mode_and_escapes(page):
    assert html.escape(SITES[1]) in page
    assert "south<script>" not in page
    for site in SITES:
        assert html.escape(site) in page
    for mode in MODES:
        assert mode in page


def test_html_states_statistics_ci_and_operating_points(page):
    assert html.escape(SENTENCE) in page
    assert "0.912 (0.871–0.948)" in page
    assert "0.437" in page and "0.881" in page and "0.902" in page
    assert "&lt; 0.001" in page  # the t-test p-value 0.0004
    assert "2.310" in page


def test_html_embeds_gradcam_and_notes_unreadable_files(page, run_dir):
    embedded = base64.b64encode((run_dir / "gradcam" / "north-0.png").read_bytes()).decode()
    assert f"data:image/png;base64,{embedded}" in page
    assert ("Right: predicted pneumonia with probability 0.87; true class pneumonia. Left: the "
            "image; right: Grad-CAM.") in page
    assert "gradcam/missing.png is missing" in page
    secret = base64.b64encode((run_dir.parent / "secret.png").read_bytes()).decode()
    assert secret not in page and "is outside the run directory" in page


def test_figures_are_stable_pngs_embedded_in_the_page(report, page):
    plots = figures(report)
    assert {"roc-global", f"roc-{SITES[0]}", "learning-global", "learning-sites",
            "data-efficiency", "label-histograms", "communication",
            "confusion-global"} <= set(plots)
    assert Image.open(io.BytesIO(plots["roc-global"])).size[0] > 300
    # A second drawing of every plot gives the bytes already embedded in the page.
    for png in plots.values():
        assert png.startswith(PNG_SIGNATURE)
        assert base64.b64encode(png).decode() in page


def test_markdown_has_mode_by_site_table(report):
    text = render_markdown(report)
    assert "| Mode | north | south&lt;script&gt;alert(1)&lt;/script&gt; | global |" in text
    assert "| federated | 0.800 ± 0.020 | 0.800 ± 0.020 | 0.800 ± 0.020 |" in text
    assert "| local | 0.820 ± 0.020 | 0.820 ± 0.020 | 0.820 ± 0.020 |" in text
    assert "0.912 (0.871–0.948)" in text
    assert "<script>" not in text
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[0] == "## The answer in brief"
    assert [h.split(".")[0] for h in headings[1:]] == [f"## {i}" for i in range(1, 13)]


def test_sections_in_same_order_in_both_outputs(page, report):
    html_titles = re.findall(r"<h2>([^<]*)</h2>", page)
    md_titles = [line[3:] for line in render_markdown(report).splitlines()
                 if line.startswith("## ")]
    assert html_titles == md_titles and len(html_titles) == 13


def test_minimal_multiclass_report_renders(tmp_path):
    report = _report(seeds=(0,), fractions=(1.0,), classes=("a", "b", "c"), history=False)
    page = render_html(report, run_dir=tmp_path)
    text = render_markdown(report)
    assert render_html(copy.deepcopy(report), run_dir=tmp_path) == page
    assert render_markdown(copy.deepcopy(report)) == text
    assert "Confusion matrices on the global test set" in page
    assert "ROC curves on the" not in page and "Data efficiency</h2>" in page
    for output in (page, text):
        assert "No ROC curves: this dataset has 3 classes" in output
        assert "No mode recorded a training history" in output
        assert "No Grad-CAM images" in output
    assert "| true \\\\ predicted | a | b | c |" in text


def test_empty_report_renders(tmp_path):
    assert render_markdown({}).startswith("# medfed comparison report: unnamed dataset")
    assert render_html({}, run_dir=tmp_path).startswith("<!DOCTYPE html>")
    assert figures({}) == {}


def test_a_site_with_one_image_of_a_class_shows_not_estimable_never_a_zero_width_interval(
        report, run_dir):
    # One "normal" image among nine, ranked perfectly: AUC would be 1.000 (1.000-1.000).
    y = np.array([0] + [1] * 8)
    probs = np.column_stack([1 - np.r_[0.05, np.linspace(0.6, 0.95, 8)],
                             np.r_[0.05, np.linspace(0.6, 0.95, 8)]])
    predictions = {"federated|global|north/test|y": y, "federated|global|north/test|p": probs,
                   "federated|global|north/val|y": y, "federated|global|north/val|p": probs}
    judge = _Judge(predictions, sites=["north"], classes=list(CLASSES), min_per_class=5,
                   resamples=200, seed=0, with_roc=True)
    result = judge.result("federated|global", "north/test", val=["north/val"])
    assert result["not_estimable"] == "not estimable (1 normal image)"
    assert result["metrics"]["auc"] is None and result["ci"]["auc"] is None
    assert result["metrics"]["accuracy"] == 1.0  # accuracy needs no class to be common
    changed = copy.deepcopy(report)
    changed["runs"][0]["modes"]["federated"]["results"]["north"] = result
    markdown = render_markdown(changed)
    assert "not estimable (1 normal image)" in markdown
    assert "1.000 (1.000–1.000)" not in markdown
    assert "| federated | 1.000 (interval not estimable) | not estimable (1 normal image) |" in markdown
    assert "not estimable (1 normal image)" in render_html(changed, run_dir=run_dir)


def test_long_detail_is_folded_and_the_answer_is_not(page, report):
    folded = re.findall(r"<details><summary>([^<]*)</summary>", page)
    # Each site's detail, the per-site table of images and the model card fold; the global
    # test set's results stay open.
    assert len([s for s in folded if s.startswith("Site ")]) == len(SITES)
    assert "Images per site and split, as a table" in folded
    assert "The model, its inputs and the software that trained it" in folded
    assert not any(s.startswith("Global test set") for s in folded)
    assert page.count("<details>") == page.count("</details>") == len(folded)
    # Markdown has no folds: the same tables in full.
    markdown = render_markdown(report)
    assert "<details>" not in markdown and "Images per site and split" in markdown


def test_the_model_card_states_the_privacy_guarantee(report, run_dir):
    changed = copy.deepcopy(report)
    sentence = ("Each site's training examples are protected by (epsilon = 7.99, delta = 1e-05)"
                "-differential privacy over the whole run.")
    changed["model_card"] = {**(changed.get("model_card") or {}), "privacy": sentence}
    assert html.escape(sentence) in render_html(changed, run_dir=run_dir)
    assert sentence in render_markdown(changed)


# --- the answer first ----------------------------------------------------------------------------

def _comparison(b: str, *, difference: float, p: float | None, n: int = 10, ties: int = 0,
                dz: float = 0.9) -> dict:
    wins = n - ties if difference > 0 else 2
    return {"label_a": "federated", "label_b": b, "metric": "auc", "n": n, "n_dropped": 0,
            "mean_difference": difference, "wins": wins, "ties": ties, "losses": n - ties - wins,
            "wilcoxon_p": p, "ttest_p": p, "cohens_dz": dz, "note": None, "sentence": "…"}


def test_the_answer_comes_first_and_reads_the_paired_tests(page, report):
    text = html.unescape(page)
    title, answer = text.index("<h1>"), text.index("<h2>The answer in brief</h2>")
    forest, summary = text.index('alt="Global test AUC per mode'), text.index("<h2>1. Summary")
    assert title < answer < forest < summary
    # The report's only test: 4 site x seed pairs, too few for the Wilcoxon test to reach 0.05.
    assert ("<strong>Federated vs each site training alone: cannot say yet.</strong> Federated "
            "higher on 4 of 4 site × seed pairs; mean AUC difference +0.052 (d_z 2.31, p = 0.12). "
            "Too few pairs for the test to reach p < 0.05 (4 differ, 6 needed): add seeds or "
            "sites.") in text
    assert "Federated vs pooled (centralized) training: cannot say.</strong> The report holds " \
           "no test of this comparison." in text
    # The long statistical sentences left the summary: they are in section 6 alone.
    assert text[summary:].index(SENTENCE) > text[summary:].index("<h2>6. Statistical")


def test_verdicts_decide_at_the_wilcoxon_level(report):
    changed = copy.deepcopy(report)
    changed["statistics"] = [
        _comparison("local", difference=0.05, p=0.002),
        _comparison("best local site", difference=0.01, p=None, n=2, dz=0.5),
        _comparison("centralized", difference=-0.031, p=0.01, dz=-1.1),
        _comparison("scratch", difference=0.004, p=0.43, dz=0.1),
        _comparison("classical-svm-pixels", difference=0.1, p=0.0004, dz=2.0),
    ]
    changed["statistics"][1]["note"] = "all differences are zero: no test or effect size applies"
    text = render_markdown(changed)
    for line in (
        "- **Federated vs each site training alone: yes, federated is better.** Federated higher "
        "on 10 of 10 site × seed pairs; mean AUC difference +0.050 (d\\_z 0.90, p = 0.002).",
        "- **Federated vs the best single site's model (global test set): cannot say yet.** "
        "Federated higher on 2 of 2 seeds; mean AUC difference +0.010 (d\\_z 0.50, p n/a). All "
        "differences are zero: no test or effect size applies.",
        "- **Federated vs pooled (centralized) training: federated falls short of pooling.** "
        "Federated higher on 2 of 10 site × seed pairs; mean AUC difference -0.031 (d\\_z -1.10, "
        "p = 0.01).",
        "- **Transfer learning (ImageNet weights) vs training from scratch: no significant "
        "difference.**",
        "- **Transfer learning (federated) vs classical machine learning: federated is better "
        "than 1 of 1.** classical-svm-pixels: +0.100 (d\\_z 2.00, p &lt; 0.001).",
    ):
        assert line in text, line


def test_a_verdict_that_cannot_be_given_says_why():
    report = _report(seeds=(0,), fractions=(1.0,))
    report["modes"] = ["federated", "local"]
    text = render_markdown(report)
    assert "**Transfer learning (ImageNet weights) vs training from scratch: cannot say.** " \
           "scratch was not run (--compare all runs every mode)." in text
    assert "classical machine learning: cannot say.** No classical baseline was run" in text
    assert "One seed: each verdict rests on one training run per mode" in text
    report["modes"] = ["centralized", "local"]
    assert "Federated training was not run" in render_markdown(report)


def test_the_forest_plot_shows_each_mode_and_run(report):
    assert "forest-global-auc" in figures(report)
    text = render_markdown(report)
    assert "| Mode | Run | Global test AUC (95% CI) |" in text
    final = [r for r in report["runs"] if r["fraction"] == 1.0]
    for run in final:
        for mode in MODES:
            entry = run["modes"][mode]
            result = (entry["results"].get("global") or
                      max(entry["local_on_global"].values(), key=lambda r: r["metrics"]["auc"]))
            low, high = result["ci"]["auc"]
            cell = f"{result['metrics']['auc']:.3f} ({low:.3f}–{high:.3f})"
            assert f"| {mode} | seed {run['seed']} | {cell} |" in text, (mode, cell)
