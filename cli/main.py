"""The `medfed` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from medfed.common.config import Config, load_yaml, parse_assignment, set_value
from medfed.common.errors import MedfedError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Federated fine-tuning of pretrained CNNs for medical imaging.")

# CLI option -> config key; options left unset keep the config file's (or default) value.
OPTION_KEYS = {
    "data": "data.path", "skip_bad": "data.skip_bad", "dataset": "data.dataset", "data_dir": "data.data_dir", "image_size": "data.image_size",
    "resolution": "data.resolution", "sites": "partition.sites", "partition": "partition.scheme",
    "alpha": "partition.alpha", "backbone": "model.backbone", "weights": "model.weights",
    "freeze": "model.freeze", "bn": "model.bn", "optimizer": "train.optimizer", "lr": "train.lr",
    "batch_size": "train.batch_size", "local_epochs": "train.local_epochs",
    "device": "train.device", "rounds": "federation.rounds", "strategy": "federation.strategy",
    "mu": "federation.mu", "seed": "seed", "out": "out", "equalize": "data.equalize",
    "compare": "evidence.compare", "seeds": "evidence.seeds", "folds": "evidence.folds",
    "train_fraction": "evidence.train_fractions",
}


@app.callback()
def main() -> None:
    """medfed: one diagnostic classifier trained across hospitals; no image leaves its site."""


@app.command()
def simulate(
    config: Optional[Path] = typer.Option(None, help="YAML config (see simulations/configs/)."),
    data: Optional[str] = typer.Option(
        None, help="Your own images instead of MedMNIST: a folder with one subfolder per class, "
                   "or a CSV manifest path,label[,site][,patient_id]."),
    skip_bad: Optional[bool] = typer.Option(
        None, "--skip-bad", help="Leave out unreadable files (and say how many) instead of refusing."),
    clahe: bool = typer.Option(False, "--clahe", help="Contrast-limited adaptive histogram equalization."),
    dataset: Optional[str] = typer.Option(None, help="MedMNIST 2D dataset, e.g. pneumoniamnist."),
    data_dir: Optional[str] = typer.Option(None, help="Folder with MedMNIST npz files (env MEDFED_DATA_DIR)."),
    resolution: Optional[int] = typer.Option(None, help="MedMNIST file resolution: 28, 64, 128, 224."),
    image_size: Optional[int] = typer.Option(
        None, help="Model input size in pixels (default: 64 for MedMNIST, the backbone's own "
                   "224, InceptionV3 299, for --data)."),
    sites: Optional[int] = typer.Option(None, help="Number of simulated hospital sites."),
    partition: Optional[str] = typer.Option(None, help="iid, dirichlet, quantity, pathological, or natural (the manifest's site column)."),
    alpha: Optional[float] = typer.Option(None, help="Dirichlet concentration (smaller = more skew)."),
    backbone: Optional[str] = typer.Option(None, help="timm model name."),
    weights: Optional[str] = typer.Option(None, help="imagenet, none, or a checkpoint path."),
    freeze: Optional[str] = typer.Option(None, help="Stages frozen after the stem; 0 = none, all = head only."),
    bn: Optional[str] = typer.Option(None, help="BatchNorm policy: avg or local (FedBN)."),
    strategy: Optional[str] = typer.Option(None, help="fedavg, fedprox, fedadam, fedyogi, fedmedian, fedtrimmedavg."),
    mu: Optional[float] = typer.Option(None, help="FedProx proximal weight."),
    rounds: Optional[int] = typer.Option(None, help="Federated rounds."),
    local_epochs: Optional[int] = typer.Option(None, help="Local epochs per round."),
    optimizer: Optional[str] = typer.Option(None, help="adam or sgd."),
    lr: Optional[float] = typer.Option(None, help="Local learning rate."),
    batch_size: Optional[int] = typer.Option(None, help="Local batch size."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda."),
    seed: Optional[int] = typer.Option(None, help="Seed for partitioning, initialisation and shuffling."),
    out: Optional[str] = typer.Option(None, help="Run directory (must not exist yet)."),
    compare: Optional[str] = typer.Option(
        None, help="Modes on identical splits: all, or a comma-separated subset of federated, "
                   "centralized, local, scratch, classical (default: all)."),
    seeds: Optional[str] = typer.Option(None, help="Repeat everything per seed, e.g. 0,1,2 (default: --seed)."),
    folds: Optional[int] = typer.Option(None, help="k-fold cross-validation of every site's split."),
    train_fraction: Optional[str] = typer.Option(
        None, help="Fractions of each site's training data, e.g. 0.1,0.25,0.5,1.0 (data-efficiency study)."),
    set_: list[str] = typer.Option([], "--set", help="Override any config key: section.key=value."),
    verbose: bool = typer.Option(False, help="Show Flower's and Ray's own logs."),
) -> None:
    """Simulate a federation on a public MedMNIST dataset (or your --data) split across virtual sites."""
    options = {k: v for k, v in locals().items() if k in OPTION_KEYS and v is not None}
    if clahe:
        options["equalize"] = "clahe"
    try:
        from medfed.simulations.compare import simulate as run_simulation

        resolved = load_yaml(config) if config else Config()
        for name, value in options.items():
            set_value(resolved, OPTION_KEYS[name], value, origin=f"--{name.replace('_', '-')}")
        for assignment in set_:
            set_value(resolved, *parse_assignment(assignment))
        run_dir, report = run_simulation(resolved, progress=lambda line: typer.echo(line),
                                         verbose=verbose)
    except MedfedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    print_summary(run_dir, report)


data_app = typer.Typer(no_args_is_help=True, help="Look at a site's own data; nothing leaves this machine.")
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    path: Path = typer.Argument(..., help="Folder with one subfolder per class, or a CSV manifest."),
    out: Path = typer.Option(Path("data-check.json"), help="Where to write the JSON summary."),
    classes: Optional[str] = typer.Option(None, help="The federation's classes, comma-separated; "
                                                     "other labels are reported."),
    frame: Optional[int] = typer.Option(None, help="Frame of multi-frame DICOM (default: the middle one)."),
) -> None:
    """Check a site's images before joining: counts, unreadable files, duplicates, DICOM summary,
    patient leakage. Exits 1 when the data cannot be used as it is."""
    from medfed.client.data_check import check, render
    from medfed.common.files import write_json

    try:
        summary = check(path, classes=classes.split(",") if classes else None, frame=frame)
        write_json(out, summary)
    except MedfedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(render(summary))
    typer.echo(f"summary written to {out}")
    if not summary["usable"]:
        raise typer.Exit(1)


def print_summary(run_dir: Path, report: dict) -> None:
    from medfed.simulations.report_html import summary_lines

    typer.echo("")
    typer.echo("\n".join(summary_lines(report)))
    typer.echo(f"\nrun directory: {run_dir}  (report.html, report.md, report.json; one folder per run)")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A finished `medfed simulate` run directory.")) -> None:
    """Rebuild report.json/md/html of a finished run from its saved predictions (no training)."""
    from medfed.simulations.evidence import rebuild

    try:
        rebuilt = rebuild(run_dir)
    except MedfedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    print_summary(run_dir, rebuilt)


def run() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
