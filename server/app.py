"""The medfed ServerApp: builds the global model, runs Flower's strategy loop, evaluates the chosen
model at every site and on the global test split, and writes the checkpoint and report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import (
    Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict,
)
from flwr.serverapp import Grid, ServerApp

from medfed.common import features, messages, wire
from medfed.common.config import CLASS_MEANS, Config
from medfed.common.config_checks import study_classes, validate
from medfed.common.config_loading import load_yaml
from medfed.common.dataset import LabelledImages
from medfed.common.errors import MedfedError
from medfed.common.files import save_torch
from medfed.common.device import pick_device
from medfed.common.inference import evaluate, evaluate_features
from medfed.common.metrics import SCALARS, format_number
from medfed.common.model import build_model, count_parameters
from medfed.common.privacy import DEFAULT_DELTA
from medfed.common.transforms import build_transform
from medfed.server.report import build_report, write_report
from medfed.common.schedule import (
    FINETUNE, HEAD, STAGES, PlateauSchedule, Stages, selection_rule,
)
from medfed.server.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from medfed.server.run_files import ERROR_FILE, NODES_FILE, PROGRESS_FILE
from medfed.server.aggregation import make_flower_strategy
from medfed.server.records import RoundRecord
from medfed.server.sampling import RegisteredNodes, site_name
from medfed.server.secagg import SecureGrid
from medfed.server.strategy import MedfedStrategy


def run_server(
    grid: Grid,
    *,
    config: Config,
    run_dir: Path,
    dataset: dict,
    expected_sites: list[str],
    min_sites: int | None = None,
    wait_s: float = 60.0,
    global_test: LabelledImages | None = None,
    partition: dict | None = None,
    simulated_sites: dict | None = None,
    resume: bool = False,
    roll_call: bool = False,
    registry: dict[int, str] | None = None,
    max_site_examples: int | None = None,
    progress: Callable[[str], None] = print,
) -> dict:
    """Run the whole federation and write its outputs into `run_dir`; return the report.

    With `roll_call` (real sites) it first waits up to `wait_s` for the expected sites and goes on
    with those present when at least `min_sites` (default: all) joined; a simulation's virtual
    sites exist by construction. A checkpoint is written after every round; `resume` continues
    from the checkpoint in `run_dir`. `registry` (deployment: Flower node id -> the site registered
    with that key) names the sites; nodes outside it are neither asked nor counted. With
    `privacy.secagg` training goes through SecAgg+ (server/secagg.py), whose weights are divided
    by `max_site_examples`, the largest site's training examples (a simulation knows it; in a
    deployment the sites declare theirs first)."""
    started = time.perf_counter()
    min_sites = len(expected_sites) if min_sites is None else min_sites
    num_classes = len(dataset["classes"])
    model = build_model(config.model, num_classes=num_classes, seed=config.seed)
    stage_keys = {s: wire.exchanged_keys(model, bn=config.model.bn, stage=s) for s in STAGES}
    keys = stage_keys[FINETUNE]  # every key any stage trains: the global model's arrays
    initial = wire.to_record(model, keys)
    trainable, total = count_parameters(model)
    device = pick_device(config.train.device)
    transform = build_transform(model, config.data, train=False)
    stages = Stages.of_config(config)
    round_config = messages.round_config(config, classes=list(dataset["classes"]),
                                         study=messages.study_id(run_dir),
                                         simulated=simulated_sites)

    cached: list = []  # the global test set's frozen features, computed at the first head round

    def global_metrics(arrays: ArrayRecord, server_round: int) -> dict:
        if stages.of(server_round) == HEAD:
            # The head stage never changes the layers below the classifier: their output on the
            # global test set is computed once, with those layers as the model was built.
            if not cached:
                built = build_model(config.model, num_classes=num_classes, seed=config.seed)
                cached.extend(features.site_features(built, global_test, config=config,
                                                     train=False, cache_dir=None, device=device))
            wire.load_record(model, arrays, keys=keys)
            return evaluate_features(features.classifier(model), *cached,
                                     batch_size=config.train.batch_size, device=device)
        wire.load_record(model, arrays, keys=keys)
        return evaluate(model.to(device), global_test, transform=transform,
                        batch_size=config.train.batch_size, device=device)

    schedule = PlateauSchedule(lr=stages.start_lr(stages.of(1)), federation=config.federation)
    strategy = MedfedStrategy(
        make_flower_strategy(config, num_sites=len(expected_sites)),
        statistic_keys=wire.statistic_keys(keys),
        schedule=schedule,
        stages=stages,
        stage_keys=stage_keys,
        rounds=config.federation.rounds,
        selection=config.federation.selection,
        round_config=round_config,
        expected_sites=expected_sites,
        min_sites=min_sites,
        wait_s=wait_s,
        registry=registry,
        norm_factor=config.federation.norm_factor,
        max_examples=config.federation.max_examples,
        dp=config.privacy.dp,
        clip_delta=config.privacy.delta or DEFAULT_DELTA,
        secagg=config.privacy.secagg,
        on_event=lambda event, record: _report_progress(event, record, progress, config),
    )
    arrays, done = initial, 0
    if resume:
        state = load_checkpoint(run_dir, config_json=config.to_json())
        strategy.load_state_dict(state["strategy"])
        arrays = ArrayRecord({k: Array(v) for k, v in state["arrays"].items()})
        done = state["round"]
        progress(f"resuming after round {done} from {run_dir / CHECKPOINT}")

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower calls this last in every round: global evaluation, then the checkpoint."""
        if server_round == 0 and strategy.round_offset:
            return None  # a resumed run: its starting arrays were evaluated before the interruption
        server_round += strategy.round_offset
        if server_round and server_round not in strategy.rounds:
            return None  # after early stopping the loop still ticks; nothing new happened
        result = None
        if global_test is not None:
            result = global_metrics(arrays, server_round)
            strategy.record(server_round).global_test = result
            if server_round:
                progress(f"round {server_round:>3} | global test AUC {format_number(result['auc']):>5} "
                         f"accuracy {format_number(result['accuracy']):>5} | {time.perf_counter() - started:6.1f} s")
        if server_round:
            save_checkpoint(run_dir, server_round=server_round,
                            arrays={k: a.numpy() for k, a in arrays.items()},
                            strategy_state=strategy.state_dict(), config_json=config.to_json())
        return MetricRecord({k: result[k] for k in SCALARS if result[k] is not None}) if result else None

    present = expected_sites
    if roll_call:
        present = wait_for_sites(grid, expected=expected_sites, min_sites=min_sites, wait_s=wait_s,
                                 round_config=round_config, registry=registry, progress=progress)
    if config.privacy.secagg:
        # SecAgg+ divides every site's weight by a largest one fixed before the round; real
        # sites know their own sizes only, and declare them by evaluating the model once.
        grid = SecureGrid(grid, max_weight=max_site_examples or strategy.largest_site(
            grid, arrays, timeout=config.federation.round_timeout, progress=progress))
    if stages.head_rounds and config.federation.head_start == CLASS_MEANS and not done:
        arrays = strategy.start_head(grid, arrays, timeout=config.federation.round_timeout,
                                     progress=progress)
    head_payload = wire.record_bytes(ArrayRecord({k: initial[k] for k in stage_keys[HEAD]}))
    progress(f"{len(present)} sites, {config.federation.rounds} rounds of {config.federation.strategy}"
             + (" under secure aggregation (SecAgg+)" if config.privacy.secagg else "")
             + f" ({stages.plan(config.federation.rounds)}); {trainable:,} of {total:,} "
             f"parameters trainable ({wire.record_bytes(initial) / 1e6:.2f} MB per payload"
             + (f", {head_payload / 1e3:.1f} kB in the head stage)" if stages.head_rounds else ")"))
    remaining = config.federation.rounds - done
    if remaining > 0 and not schedule.stopped:
        strategy.start(grid, arrays, num_rounds=remaining, timeout=config.federation.round_timeout,
                       evaluate_fn=after_round)
    strategy.rounds.pop(0, None)
    if schedule.stopped_at:
        progress(f"early stopping at round {schedule.stopped_at}: no better round "
                 f"({selection_rule(config.federation.selection)}) for "
                 f"{config.federation.patience} rounds")
    progress(f"final model: round {schedule.best_round} ({selection_rule(config.federation.selection)}); "
             f"evaluating it at every site")
    chosen = strategy.best_arrays or initial
    final_sites = strategy.evaluate_final(grid, chosen, timeout=config.federation.round_timeout)
    if not final_sites.evaluate:
        raise RuntimeError(f"no site returned a final evaluation: {final_sites.failures}")
    final_global = global_metrics(chosen, schedule.best_round) if global_test is not None else None

    wire.load_record(model, chosen, keys=keys)
    save_torch(run_dir / "global_model.pt",
               {"model": model.state_dict(), "config": config.to_dict(), "classes": dataset["classes"],
                "exchanged_keys": keys, "round": schedule.best_round})
    report = build_report(
        config=config.to_dict(), dataset=dataset, partition=partition, rounds=strategy.rounds,
        final_sites=final_sites, final_global=final_global,
        early_stopping={"stopped_at": schedule.stopped_at, "best_round": schedule.best_round,
                        "best_score": schedule.best_loss,
                        "criterion": selection_rule(config.federation.selection),
                        "smoothing": config.federation.smoothing},
        model={"backbone": config.model.backbone, "weights": config.model.weights,
               "freeze": config.model.freeze, "trainable_params": trainable, "total_params": total,
               "exchanged_tensors": len(keys), "payload_bytes": wire.record_bytes(initial),
               "head_payload_bytes": head_payload, "head_rounds": stages.head_rounds,
               "head_start": config.federation.head_start,
               "head_start_bytes": strategy.head_start_bytes,
               "head_center_bytes": wire.record_bytes(strategy.center_record() or ArrayRecord()),
               "feature_views": config.train.feature_views},
        wall_s=time.perf_counter() - started,
        resumed_from=done or None,
    )
    write_report(run_dir, report)
    return report


def wait_for_sites(grid: Grid, *, expected: list[str], min_sites: int, wait_s: float,
                   round_config: dict, registry: dict[int, str] | None,
                   progress: Callable[[str], None]) -> list[str]:
    """Wait (bounded) for the expected sites; the names of those present, or an error naming
    the missing ones when fewer than `min_sites` came. With a registry only registered nodes
    are asked and counted, under their registered names."""
    if registry is not None:
        grid = RegisteredNodes(grid, registry)
    deadline = time.monotonic() + wait_s
    while len(list(grid.get_node_ids())) < len(expected) and time.monotonic() < deadline:
        time.sleep(1.0)
    present = sorted(s for s in _site_names(grid, round_config=round_config, registry=registry).values()
                     if s in expected)
    missing = [s for s in expected if s not in present]
    if len(present) < min_sites:
        raise MedfedError(
            f"only {len(present)} of {len(expected)} sites joined within {wait_s:.0f} s "
            f"(min-sites {min_sites}); missing: {', '.join(missing) or 'none by name'}"
        )
    if missing:
        progress(f"going on without {', '.join(missing)}: {len(present)} of {len(expected)} sites "
                 f"joined within {wait_s:.0f} s (min-sites {min_sites})")
    return present


def _site_names(grid: Grid, *, round_config: dict,
                registry: dict[int, str] | None) -> dict[int, str]:
    """Ask every connected node which site it is (its answer comes from its own node config)."""
    messages = [
        Message(content=RecordDict({"config": ConfigRecord(round_config)}),
                message_type=MessageType.QUERY, dst_node_id=node)
        for node in grid.get_node_ids()
    ]
    replies = grid.send_and_receive(messages, timeout=60.0)
    return {r.metadata.src_node_id: site_name(r, registry) for r in replies if not r.has_error()}


def _report_progress(event: str, record: RoundRecord, progress, config: Config) -> None:
    if event == "train":
        sites = "  ".join(f"{s} {v['loss']:.3f}" for s, v in sorted(record.train.items()))
        progress(f"round {record.round:>3}/{config.federation.rounds} | lr {record.lr:.1e} | "
                 f"train loss {sites}")
        for failure in record.failures:
            progress(f"round {record.round:>3} | site failed: {failure}")
        for rejection in record.rejected:
            progress(f"round {record.round:>3} | update rejected: {rejection}")
        if record.privacy:
            spent = "  ".join(f"{s} {v['epsilon']:.2f}" for s, v in sorted(record.privacy.items()))
            progress(f"round {record.round:>3} | privacy spent (epsilon) {spent}")
        if record.client_privacy:
            epsilon = record.client_privacy["epsilon"]
            progress(f"round {record.round:>3} | client-level privacy: epsilon "
                     f"{'inf (no noise)' if epsilon is None else f'{epsilon:.2f}'} over "
                     f"{record.round} round(s), {record.client_privacy['sites']} updates aggregated")
    else:
        progress(f"round {record.round:>3} | aggregated val loss {record.val_loss:.4f} "
                 f"AUC {format_number(record.val_auc)}")


def make_server_app(**settings) -> ServerApp:
    """A ServerApp bound to settings computed before the run (used by the simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, **settings)

    return app


app = ServerApp()


@app.main()
def deployed(grid: Grid, context: Context) -> None:
    """The ServerApp that `medfed server start` runs on a SuperLink. Its settings arrive in
    Flower's run config: `config-path` (the study's resolved YAML), `run-dir`, `expected-sites`
    (comma-separated), `min-sites`, `wait-sites-s`, `resume` and `registered` (the sites' keys
    are registered, their node ids in the run directory's nodes.json; false only with
    --insecure)."""
    settings = context.run_config
    run_dir = Path(str(settings["run-dir"]))
    log_file = run_dir / PROGRESS_FILE

    def progress(line: str) -> None:
        print(line, flush=True)
        with log_file.open("a") as handle:
            handle.write(line + "\n")

    try:
        config = validate(load_yaml(str(settings["config-path"])))
        classes = study_classes(config)
        expected = [s for s in str(settings["expected-sites"]).split(",") if s]
        registry = None
        if settings["registered"]:
            nodes = json.loads((run_dir / NODES_FILE).read_text())
            registry = {int(node): site for site, node in nodes.items()}
        run_server(grid, config=config, run_dir=run_dir,
                   dataset={"name": run_dir.name, "classes": classes},
                   expected_sites=expected, min_sites=int(settings["min-sites"]),
                   wait_s=float(settings["wait-sites-s"]), resume=bool(settings["resume"]),
                   roll_call=True, registry=registry, progress=progress)
    except Exception as exc:
        # The launcher shows this file: the user sees why the run stopped, not a remote traceback.
        (run_dir / ERROR_FILE).write_text(f"{exc if isinstance(exc, MedfedError) else repr(exc)}\n")
        raise
