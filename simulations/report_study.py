"""The comparison report's sections 8 to 12: the study behind the numbers (sites and their
labels, communication and time, Grad-CAM examples, the model card, the data citation). Each
section turns the report dict into document blocks."""

from __future__ import annotations

from collections.abc import Sequence

from medfed.common.dataset import SPLITS
from medfed.common.document import Block, Folded, Gallery, Heading, Paragraph, Picture, Plot, Table
from medfed.common.metrics import MISSING, format_number
from medfed.simulations.report_fields import (
    all_runs, class_names, mode_entry, mode_names, site_names,
)
from medfed.simulations.report_plots import cost_drawer, histogram_drawer
from medfed.simulations.report_text import megabytes, site_label
from medfed.simulations.statistics import mean_std


# --- section 8: sites ----------------------------------------------------------------------------

def _sites_section(report: dict) -> list[Block]:
    sites, classes = report.get("sites") or {}, class_names(report)
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
            images = str((info.get("n") or {}).get(split, MISSING))
            rows.append((site_label(report, site), split, images,
                         *(str(c) for c in counts + [MISSING] * (width - len(counts)))))
    return [*blocks, Plot("label-histograms", "Images per class, site and split",
                          histogram_drawer(sites, names)),
            Folded("Images per site and split, as a table",
                   (Table(("Site", "Split", "Images", *names), tuple(rows),
                          "Images per site and split"),))]


# --- section 9: communication and time -----------------------------------------------------------

def _cost_section(report: dict) -> list[Block]:
    runs, modes = all_runs(report), mode_names(report)
    blocks: list[Block] = [Heading(2, "9. Communication and time")]
    rows, costs = [], {}
    for mode in modes:
        up = mean_std([(mode_entry(r, mode).get("bytes") or {}).get("up") for r in runs])
        down = mean_std([(mode_entry(r, mode).get("bytes") or {}).get("down") for r in runs])
        wall = mean_std([mode_entry(r, mode).get("wall_s") for r in runs])
        costs[mode] = (up["mean"], down["mean"], wall)
        spread = f" ± {wall['std']:.1f}" if wall["std"] is not None else ""
        rows.append((mode, megabytes(up["mean"]), megabytes(down["mean"]),
                     MISSING if wall["mean"] is None else f"{wall['mean']:.1f}{spread} s"))
    total = (report.get("timing") or {}).get("wall_s")
    text = ("Data sent between the sites and the server (mean per run; only federated modes "
            "communicate) and training time per mode (mean ± standard deviation over runs).")
    if total is not None:
        text += f" The whole comparison took {total / 60:.1f} minutes."
    measured = any(v is not None for up, down, wall in costs.values()
                   for v in (up, down, wall["mean"]))
    plot = [Plot("communication", "Data sent and wall time per mode",
                 cost_drawer(report, costs))] if measured else []
    return [*blocks, Paragraph(text), *plot,
            Table(("Mode", "Sent by sites (up)", "Sent to sites (down)", "Wall time"),
                  tuple(rows), "Communication and time per mode")]


# --- section 10: Grad-CAM ------------------------------------------------------------------------

def _gradcam_section(report: dict) -> list[Block]:
    examples = report.get("gradcam") or []
    blocks: list[Block] = [Heading(2, "10. Grad-CAM examples")]
    if not examples:
        return [*blocks, Paragraph("No Grad-CAM images in this report.")]
    blocks.append(Paragraph(
        "Each pair shows a test image as the site decoded it (for DICOM, after windowing), "
        "enlarged without smoothing, and beside it the same image coloured by Grad-CAM: warm "
        "colours mark the regions that most influenced the model's answer. Check that the model "
        "looks at the anatomy, not at labels, borders or devices. The probability is the one the "
        "model gave to its answer."))
    sites = site_names(report)
    sites += [s for s in dict.fromkeys(e.get("site") for e in examples) if s not in sites]
    classes = class_names(report)
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
    verdict = "Right" if example.get("correct") else "Wrong"
    probability = example.get("probability")
    p = MISSING if probability is None else f"{probability:.2f}"
    return (f"{verdict}: predicted {example.get('predicted')} with probability {p}; true class "
            f"{example.get('true')}. Left: the image; right: Grad-CAM.")


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


STUDY_SECTIONS = (_sites_section, _cost_section, _gradcam_section, _model_card_section,
                  _citation_section)
