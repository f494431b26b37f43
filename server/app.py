"""The medfed ServerApp: builds the global model, runs Flower's strategy loop, evaluates the chosen
model at every site and on the global test split, and writes the checkpoint and report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from medfed.common import wire
from medfed.common.config import Config
from medfed.common.dataset import LabelledImages
from medfed.common.inference import evaluate, pick_device
from medfed.common.metrics import SCALARS
from medfed.common.model import build_model, count_parameters
from medfed.common.transforms import build_transform
from medfed.server.report import build_report, write_report
from medfed.server.schedule import PlateauSchedule
from medfed.server.strategy import MedfedStrategy, RoundRecord, make_flower_strategy


def run_server(
    grid: Grid,
    *,
    config: Config,
    run_dir: Path,
    dataset: dict,
    num_sites: int,
    global_test: LabelledImages | None = None,
    partition: dict | None = None,
    site_config: dict | None = None,
    progress: Callable[[str], None] = print,
) -> dict:
    """Run the whole federation and write its outputs into `run_dir`; return the report."""
    started = time.perf_counter()
    num_classes = len(dataset["classes"])
    model = build_model(config.model, num_classes=num_classes, seed=config.seed)
    keys = wire.exchanged_keys(model, bn=config.model.bn)
    initial = wire.to_record(model, keys)
    trainable, total = count_parameters(model)
    device = pick_device(config.train.device)
    transform = build_transform(model, config.data, train=False)

    def global_metrics(arrays: ArrayRecord) -> dict:
        wire.load_record(model, arrays, keys=keys)
        return evaluate(model.to(device), global_test, transform=transform,
                        batch_size=config.train.batch_size, device=device)

    schedule = PlateauSchedule(lr=config.train.lr, federation=config.federation)
    strategy = MedfedStrategy(
        make_flower_strategy(config, num_sites=num_sites),
        statistic_keys=wire.statistic_keys(keys),
        schedule=schedule,
        round_config={"medfed-config": config.to_json(), "num-classes": num_classes,
                      "classes": list(dataset["classes"]),
                      **(site_config or {})},
        on_event=lambda event, record: _report_progress(event, record, progress, config),
    )

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if global_test is None or (server_round and server_round not in strategy.rounds):
            return None  # after early stopping the loop still ticks; nothing new to evaluate
        result = global_metrics(arrays)
        strategy.record(server_round).global_test = result
        if server_round:
            g = result
            progress(f"round {server_round:>3} | global test AUC {_num(g['auc'])} "
                     f"accuracy {_num(g['accuracy'])} | {time.perf_counter() - started:6.1f} s")
        return MetricRecord({k: result[k] for k in SCALARS if result[k] is not None})

    progress(f"{num_sites} sites, {config.federation.rounds} rounds of {config.federation.strategy}; "
             f"{trainable:,} of {total:,} parameters trainable "
             f"({wire.record_bytes(initial) / 1e6:.2f} MB per payload)")
    strategy.start(
        grid, initial, num_rounds=config.federation.rounds,
        timeout=config.federation.round_timeout, evaluate_fn=evaluate_fn,
    )
    strategy.rounds.pop(0, None)
    if schedule.stopped_at:
        progress(f"early stopping at round {schedule.stopped_at}: no lower aggregated validation "
                 f"loss for {config.federation.patience} rounds")
    progress(f"final model: round {schedule.best_round} (lowest aggregated validation loss); "
             f"evaluating it at every site")
    chosen = strategy.best_arrays or initial
    final_sites = strategy.evaluate_final(grid, chosen, timeout=config.federation.round_timeout)
    if not final_sites.evaluate:
        raise RuntimeError(f"no site returned a final evaluation: {final_sites.failures}")
    final_global = global_metrics(chosen) if global_test is not None else None

    wire.load_record(model, chosen, keys=keys)
    torch.save({"model": model.state_dict(), "config": config.to_dict(), "classes": dataset["classes"],
                "exchanged_keys": keys, "round": schedule.best_round}, run_dir / "global_model.pt")
    report = build_report(
        config=config.to_dict(), dataset=dataset, partition=partition, rounds=strategy.rounds,
        final_sites=final_sites, final_global=final_global,
        early_stopping={"stopped_at": schedule.stopped_at, "best_round": schedule.best_round,
                        "best_val_loss": schedule.best_loss},
        model={"backbone": config.model.backbone, "weights": config.model.weights,
               "freeze": config.model.freeze, "trainable_params": trainable, "total_params": total,
               "exchanged_tensors": len(keys), "payload_bytes": wire.record_bytes(initial)},
        wall_s=time.perf_counter() - started,
    )
    write_report(run_dir, report)
    return report


def _num(value) -> str:
    return "  n/a" if value is None else f"{value:.3f}"


def _report_progress(event: str, record: RoundRecord, progress, config: Config) -> None:
    if event == "train":
        sites = "  ".join(f"{s} {v['loss']:.3f}" for s, v in sorted(record.train.items()))
        progress(f"round {record.round:>3}/{config.federation.rounds} | lr {record.lr:.1e} | "
                 f"train loss {sites}")
        for failure in record.failures:
            progress(f"round {record.round:>3} | site failed: {failure}")
    else:
        progress(f"round {record.round:>3} | aggregated val loss {record.val_loss:.4f}")


def make_server_app(**settings) -> ServerApp:
    """A ServerApp bound to settings computed before the run (used by the simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, **settings)

    return app
