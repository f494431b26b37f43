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
    "dataset": "data.dataset", "data_dir": "data.data_dir", "image_size": "data.image_size",
    "resolution": "data.resolution", "sites": "partition.sites", "partition": "partition.scheme",
    "alpha": "partition.alpha", "backbone": "model.backbone", "weights": "model.weights",
    "freeze": "model.freeze", "bn": "model.bn", "optimizer": "train.optimizer", "lr": "train.lr",
    "batch_size": "train.batch_size", "local_epochs": "train.local_epochs",
    "device": "train.device", "rounds": "federation.rounds", "strategy": "federation.strategy",
    "mu": "federation.mu", "seed": "seed", "out": "out",
}


@app.callback()
def main() -> None:
    """medfed: one diagnostic classifier trained across hospitals; no image leaves its site."""


@app.command()
def simulate(
    config: Optional[Path] = typer.Option(None, help="YAML config (see simulations/configs/)."),
    dataset: Optional[str] = typer.Option(None, help="MedMNIST 2D dataset, e.g. pneumoniamnist."),
    data_dir: Optional[str] = typer.Option(None, help="Folder with MedMNIST npz files [env MEDFED_DATA_DIR]."),
    resolution: Optional[int] = typer.Option(None, help="MedMNIST file resolution: 28, 64, 128, 224."),
    image_size: Optional[int] = typer.Option(None, help="Model input size in pixels."),
    sites: Optional[int] = typer.Option(None, help="Number of simulated hospital sites."),
    partition: Optional[str] = typer.Option(None, help="iid, dirichlet, quantity or pathological."),
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
    set_: list[str] = typer.Option([], "--set", help="Override any config key: section.key=value."),
    verbose: bool = typer.Option(False, help="Show Flower's and Ray's own logs."),
) -> None:
    """Simulate a federation on a public MedMNIST dataset split across virtual sites."""
    options = {k: v for k, v in locals().items() if k in OPTION_KEYS and v is not None}
    try:
        from medfed.simulations.run import simulate as run_simulation

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


def print_summary(run_dir: Path, report: dict) -> None:
    from medfed.server.report import metrics_table

    rows = dict(report["final"]["sites"])
    if report["final"]["global"]:
        rows["global"] = report["final"]["global"]
    typer.echo("")
    typer.echo("\n".join(metrics_table(rows)))
    typer.echo(f"\nrun directory: {run_dir}  (report.md, report.json, metrics.csv, global_model.pt)")


def run() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
