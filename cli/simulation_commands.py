"""The simulation commands: `medfed simulate`, `medfed bench` and `medfed report`.

Options are read and the config validated before torch and Flower load (they are imported inside
each command), so a bad option is answered at once.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NoReturn, Optional

import typer

from medfed.cli.errors import INTERRUPTED, fail
from medfed.common.config import Config
from medfed.common.config_checks import resolve
from medfed.common.config_loading import load_yaml, parse_assignment, set_value
from medfed.common.errors import MedfedError

# CLI option -> config key; options left unset keep the config file's (or default) value.
OPTION_KEYS = {
    "data": "data.path", "skip_bad": "data.skip_bad", "dataset": "data.dataset", "data_dir": "data.data_dir", "image_size": "data.image_size",
    "resolution": "data.resolution", "sites": "partition.sites", "partition": "partition.scheme",
    "alpha": "partition.alpha", "backbone": "model.backbone", "weights": "model.weights",
    "freeze": "model.freeze", "bn": "model.bn", "optimizer": "train.optimizer", "lr": "train.lr",
    "batch_size": "train.batch_size", "local_epochs": "train.local_epochs",
    "local_steps": "train.local_steps", "head_rounds": "federation.head_rounds",
    "head_lr": "train.head_lr", "feature_views": "train.feature_views",
    "device": "train.device", "rounds": "federation.rounds", "strategy": "federation.strategy",
    "mu": "federation.mu", "seed": "seed", "out": "out", "equalize": "data.equalize",
    "compare": "evidence.compare", "seeds": "evidence.seeds", "folds": "evidence.folds",
    "train_fraction": "evidence.train_fractions",
    "attack": "attack.kind", "attackers": "attack.sites",
    "dp": "privacy.dp", "epsilon": "privacy.epsilon", "delta": "privacy.delta",
    "max_grad_norm": "privacy.max_grad_norm", "noise_multiplier": "privacy.noise_multiplier",
    "clip": "privacy.clip", "secagg": "privacy.secagg",
}


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
    bn: Optional[str] = typer.Option(None, help="BatchNorm policy: avg, local (FedBN) or frozen (for DP-SGD)."),
    strategy: Optional[str] = typer.Option(None, help="fedavg, fedprox, fedadam, fedyogi, fedavgm, fedmedian, fedtrimmedavg, krum, multikrum, bulyan."),
    mu: Optional[float] = typer.Option(None, help="FedProx proximal weight."),
    rounds: Optional[int] = typer.Option(None, help="Federated rounds."),
    local_epochs: Optional[int] = typer.Option(None, help="Local epochs per round."),
    local_steps: Optional[int] = typer.Option(
        None, help="Optimizer steps per round at every site, whatever its size (instead of epochs)."),
    head_rounds: Optional[int] = typer.Option(
        None, help="First rounds that train the classifier alone on cached frozen features."),
    head_lr: Optional[float] = typer.Option(None, help="Learning rate of the head rounds."),
    feature_views: Optional[int] = typer.Option(
        None, help="Augmented views per training image cached for the head rounds (0: plain image)."),
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
    attack: Optional[str] = typer.Option(
        None, help="Simulate an attack by the first --attackers sites: sign-flip, scaled, noise "
                   "or label-flip (strength: --set attack.scale=S)."),
    attackers: Optional[int] = typer.Option(None, help="Number of attacking sites (with --attack)."),
    dp: Optional[str] = typer.Option(
        None, help="Differential privacy: none, sample (DP-SGD at every site, each site's "
                   "examples protected over the run) or client (updates clipped, their sum noised)."),
    epsilon: Optional[float] = typer.Option(None, help="--dp sample: each site's budget over the run."),
    delta: Optional[float] = typer.Option(None, help="DP delta (default 1e-5, lower for a site "
                                                     "with more than 10,000 training examples)."),
    max_grad_norm: Optional[float] = typer.Option(
        None, help="--dp sample: per-example gradient clipping norm (default 1.0)."),
    noise_multiplier: Optional[float] = typer.Option(
        None, help="--dp sample: instead of --epsilon; --dp client: the noise, in units of --clip."),
    clip: Optional[float] = typer.Option(None, help="--dp client: each site's update is clipped to this L2 norm."),
    secagg: Optional[bool] = typer.Option(
        None, "--secagg", help="Secure aggregation (Flower's SecAgg+): the server sees only the sum of the "
                               "sites' updates; 3 or more sites."),
    set_: list[str] = typer.Option([], "--set", help="Override any config key: section.key=value."),
    verbose: bool = typer.Option(False, help="Show Flower's and Ray's own logs."),
) -> None:
    """Simulate a federation on a public MedMNIST dataset (or your --data) split across virtual sites."""
    options = {k: v for k, v in locals().items() if k in OPTION_KEYS and v is not None}
    if clahe:
        options["equalize"] = "clahe"
    with interrupt_guard(verbose) as progress:
        try:
            resolved = resolve_config(config, options, set_)
            # Imported once the options are read: a bad option is refused without loading torch/Flower.
            from medfed.simulations.compare import simulate as run_simulation

            run_dir, report = run_simulation(resolved, progress=progress, verbose=verbose)
        except KeyboardInterrupt as exc:
            simulation_interrupted(getattr(exc, "kept", None))
        except MedfedError as exc:
            fail(exc, code=2)
    print_summary(run_dir, report)


def resolve_config(path: Optional[Path], options: dict, assignments: list[str]) -> Config:
    """Defaults, then the YAML file, then the options, then --set; validated and resolved here,
    the one place: a bad value is answered at once, before torch and Flower load."""
    resolved = load_yaml(path) if path else Config()
    for name, value in options.items():
        set_value(resolved, OPTION_KEYS[name], value, origin=f"--{name.replace('_', '-')}")
    for assignment in assignments:
        set_value(resolved, *parse_assignment(assignment))
    return resolve(resolved)


def bench(
    config: Optional[Path] = typer.Option(None, help="YAML config: medfed's recipe (default: the defaults)."),
    dataset: Optional[str] = typer.Option(None, help="MedMNIST 2D dataset, e.g. breastmnist."),
    data_dir: Optional[str] = typer.Option(None, help="Folder with MedMNIST npz files (env MEDFED_DATA_DIR)."),
    resolution: Optional[int] = typer.Option(None, help="MedMNIST file resolution: 28, 64, 128, 224."),
    image_size: Optional[int] = typer.Option(None, help="Model input size in pixels."),
    sites: Optional[int] = typer.Option(None, help="Number of simulated hospital sites."),
    alpha: Optional[float] = typer.Option(None, help="Dirichlet concentration (smaller = more skew)."),
    backbone: Optional[str] = typer.Option(None, help="timm model name (both recipes)."),
    weights: Optional[str] = typer.Option(None, help="imagenet or a checkpoint path (both recipes)."),
    rounds: Optional[int] = typer.Option(None, help="Federated rounds (both recipes)."),
    lr: Optional[float] = typer.Option(None, help="Local learning rate of fine-tuning (both recipes)."),
    local_steps: Optional[int] = typer.Option(None, help="Optimizer steps per round (both recipes)."),
    dp: Optional[str] = typer.Option(None, help="medfed's recipe with differential privacy: sample or client."),
    epsilon: Optional[float] = typer.Option(None, help="--dp sample: each site's budget over the run."),
    noise_multiplier: Optional[float] = typer.Option(None, help="--dp sample (instead of --epsilon) or client."),
    clip: Optional[float] = typer.Option(None, help="--dp client: the updates' clipping norm."),
    against: str = typer.Option("full-model", help="What medfed's recipe is compared with: "
                                                   "full-model (FedAvg of every layer) or no-dp "
                                                   "(the same recipe without --dp)."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds; each gets its own sites."),
    out: Path = typer.Option(..., help="Folder for both recipes' runs and bench.json (must not exist)."),
    set_: list[str] = typer.Option([], "--set", help="Override any config key: section.key=value."),
    verbose: bool = typer.Option(False, help="Show Flower's and Ray's own logs."),
) -> None:
    """medfed's recipe against full-model FedAvg (every layer trained and sent), or against itself
    without DP, on the same sites and seeds: AUC, bytes, time and memory side by side, with ratios."""
    # --out is bench's own folder, not a run directory of the config.
    options = {k: v for k, v in locals().items() if k in OPTION_KEYS and k != "out" and v is not None}
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        if not seed_list or min(seed_list) < 0:
            raise ValueError(seeds)
    except ValueError:
        fail(MedfedError(f"--seeds {seeds!r}: expected comma-separated whole numbers of 0 or more, e.g. 0,1,2"),
             code=2)
    with interrupt_guard(verbose) as progress:
        try:
            resolved = resolve_config(config, options, set_)
            from medfed.simulations.bench import bench as run_bench, table

            result = run_bench(resolved, seeds=seed_list, out=out, against=against,
                               progress=progress, verbose=verbose)
        except KeyboardInterrupt as exc:
            simulation_interrupted(getattr(exc, "kept", None))
        except MedfedError as exc:
            fail(exc, code=2)
    typer.echo(table(result))
    typer.echo(f"\nresults: {out / 'bench.json'}")


@contextlib.contextmanager
def interrupt_guard(verbose: bool):
    """Ctrl-C during a simulation: said once, then quiet; yields the progress printer."""
    from medfed.common.interrupts import interrupt_once

    interrupted: list[bool] = []

    def progress(line: str) -> None:
        if not interrupted:  # after Ctrl-C, the sites' failing replies are no news
            typer.echo(line)

    def on_interrupt() -> None:
        interrupted.append(True)
        if not verbose:
            quiet_simulation_engine()

    with interrupt_once(INTERRUPTED, on_interrupt=on_interrupt):
        yield progress


def quiet_simulation_engine() -> None:
    """After Ctrl-C, Flower's engine threads log every task cut short (Ray's ActorDiedError, with
    a traceback): expected then, and not the user's business. --verbose keeps them."""
    import logging

    for name in ("flwr", "ray"):
        logging.getLogger(name).disabled = True


def simulation_interrupted(kept: Optional[Path]) -> NoReturn:
    """Ctrl-C: Ray shut down, one line, exit 130, now. Flower's simulation threads (the ServerApp
    waiting for replies, the engine's workers in `ray.get`) would hold a normal exit for up to
    the round timeout, so the process ends without waiting for them."""
    from medfed.common.interrupts import exit_now, stop_descendants

    message = INTERRUPTED
    if kept is not None:
        message += f"; the unfinished run is kept as it is in {kept}/"
    exit_now(message, code=130, cleanup=stop_descendants)


def print_summary(run_dir: Path, report: dict) -> None:
    from medfed.simulations.report import summary_lines

    typer.echo("")
    typer.echo("\n".join(summary_lines(report)))
    typer.echo(f"\nrun directory: {run_dir}  (report.html, report.md, report.json; one folder per run)")


def report(run_dir: Path = typer.Argument(..., help="A finished `medfed simulate` run directory.")) -> None:
    """Rebuild report.json/md/html of a finished run from its saved predictions (no training)."""
    from medfed.simulations.evidence import rebuild

    try:
        rebuilt = rebuild(run_dir)
    except MedfedError as exc:
        fail(exc, code=2)
    print_summary(run_dir, rebuilt)
