"""report.html as a reader sees it: opened in headless Chromium at 1400 x 900, the answer (the
verdicts and the forest plot) lies on the first screen, every picture loads, the console stays
clean. The comparison page here is rendered from test_report_html's synthetic report (the real
one from a simulation is checked in test_compare); the deployment page from a study's records.
Skipped, with the reason, where Chromium is not installed."""

from __future__ import annotations

import html
import math
import re

import numpy as np
import pytest
from browser import SCREEN, chromium, read_page
from conftest import evaluation_record
from PIL import Image
from test_report_html import GRADCAM, _report

from medfed.common.config import Config
from medfed.server.records import RoundRecord
from medfed.server.report import build_report, render_markdown, write_report
from medfed.simulations.gradcam import side_by_side
from medfed.simulations.report import render_html

ANSWER = "The answer in brief"
FOREST = "Global test AUC per mode"
SITES = ("site-0", "site-1", "site-2")


@pytest.fixture(scope="module")
def browser():
    session = chromium()
    yield session
    session.quit()


@pytest.fixture(scope="module")
def comparison_page(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("comparison")
    (run_dir / "gradcam").mkdir()
    # A 28-pixel image, as MedMNIST's smallest, with a heat map at the model's input size.
    image = np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1))
    heat = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(side_by_side(image, heat)).save(run_dir / "gradcam" / "north-0.png")
    page = run_dir / "report.html"
    page.write_text(render_html(_report(gradcam=GRADCAM[:1]), run_dir=run_dir))
    return page


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A three-site study of three rounds: site-2's update is rejected in round 2 and it fails
    in round 3."""
    config = Config()
    evaluation = {site: dict(evaluation_record(20).items()) for site in SITES}
    trained = {"loss": 0.3, "n": 100}
    rounds = {
        1: RoundRecord(round=1, lr=1e-3, train={s: trained for s in SITES}),
        2: RoundRecord(round=2, lr=1e-3, train={s: trained for s in SITES[:2]},
                       rejected=["site-2: array 'w' holds NaN"], missing=["site-2"]),
        3: RoundRecord(round=3, lr=1e-3, train={s: trained for s in SITES[:2]},
                       failures=["site-2: no reply within 600 s"], missing=["site-2"]),
    }
    settings = config.to_dict()
    settings["data"]["image_size"] = 224  # as a started study resolves it
    report = build_report(
        config=settings, dataset={"name": "pneumoniamnist", "classes": ["normal", "pneumonia"]},
        partition=None, rounds=rounds,
        final_sites=RoundRecord(round=3, lr=1e-3, evaluate=evaluation), final_global=None,
        early_stopping={"stopped_at": None, "best_round": 3, "best_val_loss": math.nan},
        model={"backbone": "b", "weights": "none", "freeze": "3", "trainable_params": 1,
               "total_params": 1, "exchanged_tensors": 1, "payload_bytes": 4,
               "head_payload_bytes": 4, "head_center_bytes": 0,
               "head_start_bytes": {"up": 0, "down": 0}},
        wall_s=12.0,
    )
    run_dir = tmp_path_factory.mktemp("deployment")
    write_report(run_dir, report)
    return run_dir, report


def test_the_deployment_report_says_who_was_missing_and_why(deployment):
    run_dir, report = deployment
    page = (run_dir / "report.html").read_text()
    for text in (html.unescape(page), render_markdown(report)):
        assert "Missing (no accepted training update: absent, failed or rejected): site-2 in " \
               "rounds 2–3." in text
        assert "round 2: update rejected: site-2: array 'w' holds NaN" in text
        assert "round 3: failed: site-2: no reply within 600 s" in text
        assert "No differential privacy" in text
        for site in SITES:
            assert site in text
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    assert not re.search(r"\b(src|href)=\"?https?:", page)


def test_the_comparison_answer_is_on_the_first_screen(browser, comparison_page):
    page = read_page(browser, comparison_page, heading=ANSWER, plot=FOREST)
    assert page["errors"] == []
    assert page["viewport"] == list(SCREEN)
    assert page["verdicts"] == 5
    assert page["verdicts_bottom"] is not None and page["verdicts_bottom"] <= SCREEN[1]
    assert page["plot_bottom"] is not None and page["plot_bottom"] <= SCREEN[1], page["plot_bottom"]
    assert page["images"] and all(i["complete"] and i["natural"] > 0 for i in page["images"])
    gradcams = [i for i in page["images"] if i["alt"].startswith("Right: predicted")]
    # Image and overlay, each 224 pixels wide, shown at their own size.
    assert [(i["natural"], i["shown"]) for i in gradcams] == [(456, 456)]
    assert page["details"] >= 3


def test_the_deployment_report_opens_cleanly(browser, deployment):
    run_dir, _ = deployment
    page = read_page(browser, run_dir / "report.html")
    assert page["errors"] == []
    assert all(i["complete"] and i["natural"] > 0 for i in page["images"])
