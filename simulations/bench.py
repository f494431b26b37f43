"""`medfed bench`: medfed's recipe against another on the same splits and seeds: full-model
FedAvg (`--against full-model`, the default) or the same recipe without differential privacy
(`--against no-dp`, the cost of `--dp`).

Full-model FedAvg is federated fine-tuning written the way Flower's quickstart does it: every
layer trains (`freeze 0`, no head stage), every tensor goes on the wire, Flower's FedAvg
aggregates. Both run in this one process tree, one after the other, on each seed's identical
sites; the table gives each quantity as medfed / full-model, since run-to-run noise on a shared
machine moves absolute times more than it moves their ratio. medfed's one message per round
serves both, so full-model FedAvg here sends fewer bytes than the quickstart (which also resends
the model for evaluation): the byte ratio is, if anything, in full-model FedAvg's favour.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

from medfed.common.config import Config
from medfed.common.config_checks import validate
from medfed.common.errors import MedfedError
from medfed.common.files import claim_run_dir, write_json
from medfed.simulations.run import prepare, run_federation, save_sites

BENCH_FILE = "bench.json"


def full_model_fedavg(config: Config) -> Config:
    full = copy.deepcopy(config)
    full.model.freeze, full.model.bn = "0", "avg"
    full.federation.head_rounds, full.federation.strategy = 0, "fedavg"
    full.privacy.dp = "none"
    return full


def without_dp(config: Config) -> Config:
    plain = copy.deepcopy(config)
    plain.privacy.dp = "none"
    return plain


# What `--against` compares medfed's recipe with: (its name in the table, how it is made).
PARTNERS = {"full-model": ("full-model FedAvg", full_model_fedavg),
            "no-dp": ("without DP", without_dp)}


def bench(config: Config, *, seeds: list[int], out: Path, against: str = "full-model",
          progress=print, verbose: bool = False) -> dict:
    """Run both recipes (a validated config and its partner) on every seed's sites; write
    `<out>/bench.json` and return it."""
    if against not in PARTNERS:
        raise MedfedError(f"--against {against}: expected one of {', '.join(PARTNERS)}")
    if against == "no-dp" and config.privacy.dp == "none":
        raise MedfedError("--against no-dp compares a DP recipe with the same one without DP; "
                          "add --dp sample --epsilon E (or --dp client ...)")
    recipes = {"medfed": config, against: validate(PARTNERS[against][1](config))}
    staging = claim_run_dir(out)
    runs = []
    for seed in seeds:
        seeded = copy.deepcopy(config)
        seeded.seed = seed
        prepared = prepare(seeded)
        sites_dir = staging / f"seed-{seed}" / "sites"
        save_sites(prepared, sites_dir)
        for name, recipe in recipes.items():
            run_config = copy.deepcopy(recipe)
            run_config.seed = seed
            progress(f"== seed {seed}: {name}")
            started = time.perf_counter()
            report = run_federation(prepared, run_config, run_dir=staging / f"seed-{seed}" / name,
                                    sites_dir=sites_dir, progress=progress, verbose=verbose)
            runs.append(measure(report, recipe=name, seed=seed,
                                wall_s=time.perf_counter() - started))
    result = {"config": config.to_dict(), "seeds": seeds, "against": against, "runs": runs,
              "summary": summarize(runs, against=against)}
    write_json(staging / BENCH_FILE, result)
    staging.rename(out)
    return result


def measure(report: dict, *, recipe: str, seed: int, wall_s: float) -> dict:
    """One run's numbers, from its report: per-round bytes are the mean over its rounds of
    what all sites received and sent; client compute is the sites' summed training-message time."""
    communication = report["communication"]
    per_round = {
        direction: statistics.fmean(sum(r["sites"].values())
                                    for r in communication[f"bytes_{direction}_per_round"])
        for direction in ("up", "down")
    }
    sites = [site for r in report["rounds"] for site in r["train"].values()]
    compute = sum(site.get("compute_s", 0.0) for site in sites)
    steps = sum(site.get("train_s", 0.0) for site in sites)
    peak = max((site.get("peak_mb", 0.0) for r in report["rounds"] for site in r["train"].values()),
               default=0.0)
    return {
        "recipe": recipe, "seed": seed,
        "auc": (report["final"]["global"] or {}).get("auc"),
        "bytes_up_per_round": per_round["up"], "bytes_down_per_round": per_round["down"],
        "wall_s": wall_s, "client_compute_s": compute, "client_train_s": steps,
        "site_peak_mb": peak,
        "rounds": len(report["rounds"]),
    }


QUANTITIES = ("auc", "bytes_up_per_round", "bytes_down_per_round", "wall_s", "client_compute_s",
              "client_train_s", "site_peak_mb")


def summarize(runs: list[dict], *, against: str) -> dict:
    """Mean and standard deviation per recipe and quantity, and medfed / partner ratios."""
    summary: dict = {}
    for recipe in ("medfed", against):
        mine = [r for r in runs if r["recipe"] == recipe]
        summary[recipe] = {}
        for quantity in QUANTITIES:
            values = [r[quantity] for r in mine if r[quantity] is not None]
            summary[recipe][quantity] = {
                "mean": statistics.fmean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            }
    summary["ratio"] = {
        q: (summary["medfed"][q]["mean"] / summary[against][q]["mean"]
            if summary["medfed"][q]["mean"] is not None and summary[against][q]["mean"] else None)
        for q in QUANTITIES
    }
    return summary


def table(result: dict) -> str:
    """The side-by-side table `medfed bench` prints."""
    summary, against = result["summary"], result["against"]
    partner = PARTNERS[against][0]
    labels = {"auc": "global test AUC", "bytes_up_per_round": "bytes up / round (all sites)",
              "bytes_down_per_round": "bytes down / round (all sites)", "wall_s": "wall time (s)",
              "client_compute_s": "client compute (s)",
              "client_train_s": "client training steps (s)", "site_peak_mb": "site peak memory (MB)"}
    lines = [f"{'':32}{'medfed':>22}{partner:>22}{'ratio':>10}"]
    for quantity, label in labels.items():
        cells = []
        for recipe in ("medfed", against):
            value = summary[recipe][quantity]
            spread = f" ± {_number(value['std'], quantity)}" if len(result["seeds"]) > 1 else ""
            cells.append("n/a" if value["mean"] is None else
                         f"{_number(value['mean'], quantity)}{spread}")
        ratio = summary["ratio"][quantity]
        lines.append(f"{label:32}{cells[0]:>22}{cells[1]:>22}"
                     f"{'n/a' if ratio is None else f'{ratio:.3g}':>10}")
    spread = "mean ± standard deviation" if len(result["seeds"]) > 1 else "one seed"
    lines.append(f"(seeds {', '.join(map(str, result['seeds']))}; {spread}; "
                 f"ratio = medfed / {partner})")
    return "\n".join(lines)


def _number(value: float, quantity: str) -> str:
    if quantity == "auc":
        return f"{value:.3f}"
    if quantity.startswith("bytes"):
        return f"{value / 1e6:.3g} MB" if value >= 1e5 else f"{value / 1e3:.3g} kB"
    return f"{value:.3g}"
