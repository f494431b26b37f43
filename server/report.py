"""The run's record: report.json (the contract later tools read), report.md and report.html (the
same document blocks as the comparison report, `common.document`) and metrics.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from medfed.common.dataset import SPLITS
from medfed.common.document import Block, Heading, Items, Paragraph, Table, html_page, markdown_page
from medfed.common.messages import EVALUATED_SPLITS, clean, label_histograms, split_metrics
from medfed.common.metrics import SCALARS, format_number
from medfed.common.versions import versions
from medfed.server.records import RoundRecord


def site_summary(raw: dict) -> dict:
    histograms = label_histograms(raw)
    return {"n": {s: sum(h) for s, h in histograms.items()}, "label_histogram": histograms}


def _per_round(rounds: dict[int, RoundRecord], attribute: str) -> list[dict]:
    return [{"round": n, "sites": dict(sorted(getattr(rounds[n], attribute).items()))}
            for n in sorted(rounds)]


def build_report(
    *,
    config: dict,
    dataset: dict,
    partition: dict | None,
    rounds: dict[int, RoundRecord],
    final_sites: RoundRecord,
    final_global: dict | None,
    early_stopping: dict,
    model: dict,
    wall_s: float,
    resumed_from: int | None = None,
) -> dict:
    num_classes = len(dataset["classes"])
    round_list = []
    for number in sorted(rounds):
        record = rounds[number]
        round_list.append({
            "round": number,
            "lr": record.lr,
            "train": dict(sorted(record.train.items())),
            "evaluate": {
                site: {s: split_metrics(raw, s, num_classes) for s in EVALUATED_SPLITS}
                for site, raw in sorted(record.evaluate.items())
            },
            "val_loss": clean(record.val_loss),
            "val_auc": clean(record.val_auc),
            "global_test": record.global_test,
            "failures": record.failures,
            "rejected": record.rejected,
            "missing": record.missing,
            "selected": record.selected,
            "privacy": dict(sorted(record.privacy.items())),
            "client_privacy": record.client_privacy,
        })
    return {
        "config": config,
        "dataset": dataset,
        "partition": partition,
        "sites": {site: site_summary(raw) for site, raw in sorted(final_sites.evaluate.items())},
        "rounds": round_list,
        "final": {
            "model_round": final_sites.round,
            "early_stopping": early_stopping,
            "global": final_global,
            "sites": {site: split_metrics(raw, "test", num_classes)
                      for site, raw in sorted(final_sites.evaluate.items())},
            "failures": final_sites.failures,
        },
        "communication": {
            "trainable_params": model["trainable_params"],
            "total_params": model["total_params"],
            "exchanged_tensors": model["exchanged_tensors"],
            "payload_bytes": model["payload_bytes"],
            # What one message carries in the head stage (the classifier alone).
            "head_payload_bytes": model["head_payload_bytes"],
            # Beside it in every head-stage training message after a start from class means:
            # the features' center; and the class sums asked for once before round 1.
            "head_center_bytes": model["head_center_bytes"],
            "head_start_bytes": model["head_start_bytes"],
            "bytes_up_per_round": _per_round(rounds, "bytes_up"),
            "bytes_down_per_round": _per_round(rounds, "bytes_down"),
        },
        "model": model,
        "privacy": privacy_summary(config["privacy"], rounds),
        "timing": {"wall_s": round(wall_s, 2), "resumed_from_round": resumed_from},
        "versions": versions(),
    }


def privacy_summary(settings: dict, rounds: dict[int, RoundRecord]) -> dict:
    """What the run's differential privacy guarantees, in numbers and in one plain sentence (and
    one more under secure aggregation)."""
    mode = settings["dp"]
    summary = {"dp": mode, "sites": {}, "guarantee": ""}
    if mode == "sample":
        for number in sorted(rounds):
            summary["sites"].update(rounds[number].privacy)  # each site's latest spend
        spends = summary["sites"].values()
        if spends:
            epsilon = max(s["epsilon"] for s in spends)
            delta = max(s["delta"] for s in spends)
            summary["guarantee"] = (
                f"Each site's training examples are protected by (epsilon = {epsilon:.2f}, "
                f"delta = {delta:.0e})-differential privacy over the whole run (DP-SGD at every "
                f"site, per-example gradients clipped to {settings['max_grad_norm']:g}; the "
                f"largest spend of any site).")
    elif mode == "client":
        last = next((rounds[n].client_privacy for n in sorted(rounds, reverse=True)
                     if rounds[n].client_privacy), None)
        summary["aggregate"] = last
        if last is not None and last["epsilon"] is not None:
            summary["guarantee"] = (
                f"Each site's participation (all of its data at once) is protected by (epsilon = "
                f"{last['epsilon']:.2f}, delta = {last['delta']:.0e})-differential privacy over "
                f"the whole run, as released by the server (updates clipped to "
                f"{settings['clip']:g}, noise added to their sum by the server, which sees each "
                f"update: no secure aggregation).")
        elif last is not None:
            summary["guarantee"] = ("No differential-privacy guarantee: the noise multiplier is 0 "
                                    "(updates are clipped only).")
    else:
        summary["guarantee"] = ("No differential privacy: images never leave a site, but the "
                                "updates sent carry no formal guarantee.")
    if settings["secagg"]:
        summary["guarantee"] += (" The server saw only the weighted sum of the sites' updates in "
                                 "every round, never one site's (secure aggregation, Flower's "
                                 "SecAgg+).")
    return summary


def write_report(run_dir: Path, report: dict) -> None:
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    _write_csv(run_dir / "metrics.csv", report)
    (run_dir / "report.md").write_text(render_markdown(report))
    (run_dir / "report.html").write_text(render_html(report, run_dir=run_dir))


def _write_csv(path: Path, report: dict) -> None:
    columns = ["round", "site", "split", "n", "loss", *SCALARS]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in report["rounds"]:
            for site, values in r["train"].items():
                writer.writerow({"round": r["round"], "site": site, "split": "train", **values})
            for site, splits in r["evaluate"].items():
                for split, values in splits.items():
                    writer.writerow({"round": r["round"], "site": site, "split": split, **values})
            if r["global_test"]:
                writer.writerow({"round": r["round"], "site": "global", "split": "test",
                                 **r["global_test"]})
        for site, values in report["final"]["sites"].items():
            writer.writerow({"round": "final", "site": site, "split": "test", **values})
        if report["final"]["global"]:
            writer.writerow({"round": "final", "site": "global", "split": "test",
                             **report["final"]["global"]})


def metrics_table(rows: dict[str, dict]) -> Table:
    """One row per site (or 'global'), the clinical metrics as columns."""
    header = ("", "n", "accuracy", "balanced acc.", "sensitivity", "specificity", "precision",
              "F1", "AUC")
    columns = ("accuracy", "balanced_accuracy", "recall", "specificity", "precision", "f1", "auc")
    return Table(header, tuple((name, str(m["n"]), *(format_number(m[c]) for c in columns))
                               for name, m in rows.items()))


def render_markdown(report: dict) -> str:
    """report.md: the run in sentences and tables."""
    return markdown_page(_document(report))


def render_html(report: dict, *, run_dir: Path) -> str:
    """report.html: the same document as report.md, as one self-contained page."""
    return html_page(_title(report), _document(report), run_dir=run_dir)


def _title(report: dict) -> str:
    return (f"medfed run: {report['dataset']['name']}, {len(report['sites'])} sites, "
            f"{report['config']['federation']['strategy']}")


def _document(report: dict) -> list[Block]:
    cfg, data, final = report["config"], report["dataset"], report["final"]
    classes = data["classes"]
    stopped = final["early_stopping"]["stopped_at"]
    rows = dict(final["sites"])
    if final["global"]:
        held_out = (report.get("partition") or {}).get("global_test", "held-out test set")
        rows[f"global ({held_out})"] = final["global"]
    return [
        Heading(1, _title(report)),
        Paragraph(
            f"Backbone {cfg['model']['backbone']} (weights: {cfg['model']['weights']}, "
            f"freeze: {cfg['model']['freeze']}, BatchNorm: {cfg['model']['bn']}), "
            f"input {cfg['data']['image_size']} px, seed {cfg['seed']}. "
            f"Final model from round {final['model_round']} "
            f"({final['early_stopping'].get('criterion', 'lowest aggregated validation loss')}); "
            f"{len(report['rounds'])} rounds run"
            + (f", early stopping at round {stopped}." if stopped else ".")),
        Heading(2, "Test metrics of the final model"),
        Paragraph("Sensitivity = recall of the positive class"
                  + (f" ({classes[1]})" if len(classes) == 2 else " (macro over classes)")
                  + "; AUC n/a where a split holds one class only."),
        metrics_table(rows),
        Heading(2, "Sites"), Paragraph(_attendance_text(report)), _sites_table(report),
        Heading(2, "Rounds"), _rounds_table(report), *_trouble(report),
        Heading(2, "Communication"), Paragraph(_communication_text(report["communication"])),
        Heading(2, "Privacy"), Paragraph(report["privacy"]["guarantee"]),
        *_privacy_tables(report["privacy"]["sites"]),
        Paragraph(f"Wall time {report['timing']['wall_s']:.0f} s."),
        Heading(2, "Data"), Paragraph(data.get("citation", "")),
    ]


def _attendance_text(report: dict) -> str:
    """Who was missing in which round: a site with no accepted training update that round."""
    absent: dict[str, list[int]] = {}
    for r in report["rounds"]:
        for site in r["missing"]:
            absent.setdefault(site, []).append(r["round"])
    if not absent:
        return "Every site's training update was accepted in every round."
    return ("Missing (no accepted training update: absent, failed or rejected): "
            + "; ".join(f"{site} in round{'s' if len(numbers) > 1 else ''} {_spans(numbers)}"
                        for site, numbers in sorted(absent.items())) + ".")


def _spans(numbers: list[int]) -> str:
    """1, 2, 3, 5 -> "1–3, 5"."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in spans)


def _trouble(report: dict) -> list[Block]:
    """Every rejected reply and failure, with its round and reason."""
    lines = [f"round {r['round']}: update rejected: {text}" for r in report["rounds"]
             for text in r["rejected"]]
    lines += [f"round {r['round']}: failed: {text}" for r in report["rounds"]
              for text in r["failures"]]
    lines += [f"final evaluation: failed: {text}" for text in report["final"]["failures"]]
    if not lines:
        return [Paragraph("No reply was rejected and no site failed.")]
    return [Paragraph("Rejected replies and failures:"), Items(tuple(lines))]


def _sites_table(report: dict) -> Table:
    classes, rows = report["dataset"]["classes"], []
    for site, info in report["sites"].items():
        total = np.sum([info["label_histogram"][s] for s in SPLITS], axis=0)
        histogram = ", ".join(f"{c}: {int(n)}" for c, n in zip(classes, total))
        rows.append((site, *(str(info["n"][s]) for s in SPLITS), histogram))
    return Table(("site", *SPLITS, "label histogram (train+val+test)"), tuple(rows))


def _rounds_table(report: dict) -> Table:
    # Krum, MultiKrum and Bulyan build the global model from the updates they select: which ones.
    selecting = any(r["selected"] is not None for r in report["rounds"])
    rows = []
    for r in report["rounds"]:
        losses = [v["loss"] for v in r["train"].values()]
        g = r["global_test"] or {}
        rows.append((str(r["round"]), f"{r['lr']:.2e}",
                     format_number(float(np.mean(losses)) if losses else None),
                     format_number(r["val_loss"]), format_number(g.get("auc")),
                     format_number(g.get("accuracy")), ", ".join(r["missing"]) or "none",
                     str(len(r["rejected"])),
                     *((", ".join(r["selected"] or []) or "none",) if selecting else ())))
    return Table(("round", "lr", "mean train loss", "val loss (aggregated)", "global test AUC",
                  "global test accuracy", "sites missing", "updates rejected",
                  *(("updates selected",) if selecting else ())), tuple(rows))


def _communication_text(comm: dict) -> str:
    up = [sum(r["sites"].values()) for r in comm["bytes_up_per_round"] if r["sites"]]
    down = [sum(r["sites"].values()) for r in comm["bytes_down_per_round"] if r["sites"]]
    return (f"Trainable parameters {comm['trainable_params']:,} of {comm['total_params']:,} "
            f"({comm['exchanged_tensors']} tensors, {comm['payload_bytes'] / 1e6:.2f} MB per model "
            f"payload). Per round, all sites together: {np.mean(up) / 1e6 if up else 0:.2f} MB up, "
            f"{np.mean(down) / 1e6 if down else 0:.2f} MB down (train and evaluation messages)."
            + _head_start_text(comm))


def _head_start_text(comm: dict) -> str:
    start = comm["head_start_bytes"]
    if not start["up"]:
        return ""
    return (f" The head started from class means: once before round 1 the sites sent their "
            f"per-class sums of frozen features ({start['up'] / 1e3:.1f} kB up, "
            f"{start['down'] / 1e3:.1f} kB down, all sites together), and each head-stage "
            f"training message carried the features' center ({comm['head_center_bytes'] / 1e3:.1f} "
            f"kB).")


def _privacy_tables(spends: dict[str, dict]) -> list[Table]:
    """The DP-SGD spend per site; none when the sites spent no privacy budget."""
    if not spends:
        return []
    return [Table(("site", "epsilon", "delta", "noise multiplier", "clipping norm", "sample rate",
                   "steps"),
                  tuple((site, f"{s['epsilon']:.2f}", f"{s['delta']:.0e}",
                         f"{s['noise-multiplier']:.3f}", f"{s['max-grad-norm']:g}",
                         f"{s['sample-rate']:.3f}", str(int(s["steps"])))
                        for site, s in spends.items()))]
