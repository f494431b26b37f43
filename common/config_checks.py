"""Checking a Config: every value that needs neither the data nor the model (`validate`), the
values derived from others (`resolve`), what
depends on the number of sites once it is known, a deployed study's extra rules, and the values
parsed from the config's comma-separated and named forms."""

from __future__ import annotations

import copy
from typing import Any

from medfed.common.config import (
    ATTACKS, BN_POLICIES, BYZANTINE_MINIMUM, CLASS_MEANS, DEVICES, DP_MODES, EQUALIZERS,
    HEAD_STARTS, MAX_SEED, MEAN_STRATEGIES, MEDMNIST_RESOLUTIONS, MODES, OPTIMIZERS, PARTITIONS,
    SECAGG_MIN_SITES, SELECTIONS, STRATEGIES, Config,
)
from medfed.common.errors import MedfedError
from medfed.common.medmnist_catalogue import DATASETS


def parse_freeze(value: str) -> int | None:
    """`"all"` -> None (head only), otherwise the number of stages frozen after the stem."""
    if value == "all":
        return None
    return int(value)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise MedfedError(f"config key '{key}' has invalid value {value!r}; allowed: {allowed}")


def validate(config: Config) -> Config:
    """Check every value that does not need the data or the model; raise on the first problem."""
    d, p, m, t, f, s, e, a = (
        config.data, config.partition, config.model, config.train, config.federation,
        config.simulation, config.evidence, config.attack,
    )
    _check(d.dataset in DATASETS and d.dataset != "chestmnist", "data.dataset", d.dataset,
           ", ".join(k for k in DATASETS if k != "chestmnist")
           + " (chestmnist is multi-label, which medfed does not support yet)")
    _check(d.resolution in MEDMNIST_RESOLUTIONS, "data.resolution", d.resolution,
           ", ".join(map(str, MEDMNIST_RESOLUTIONS)))
    _check(d.image_size is None or d.image_size >= 32, "data.image_size", d.image_size,
           "at least 32 pixels (the backbones downsample by 32)")
    _check(d.equalize in EQUALIZERS, "data.equalize", d.equalize, ", ".join(EQUALIZERS))
    _check(d.frame is None or d.frame >= 0, "data.frame", d.frame, "null (middle frame) or 0 or more")
    _check(p.scheme != "natural" or d.path is not None, "partition.scheme", p.scheme,
           "natural only with data.path (a manifest with a site column)")
    _check(p.scheme in PARTITIONS, "partition.scheme", p.scheme, ", ".join(PARTITIONS))
    _check(p.sites >= 2, "partition.sites", p.sites, "2 or more")
    _check(p.alpha > 0, "partition.alpha", p.alpha, "a number > 0")
    _check(p.labels_per_site >= 1, "partition.labels_per_site", p.labels_per_site, "1 or more")
    _check(p.min_examples >= 10, "partition.min_examples", p.min_examples,
           "10 or more (each site needs a 70/15/15 split)")
    _check(m.freeze == "all" or (m.freeze.isascii() and m.freeze.isdigit()), "model.freeze", m.freeze,
           "a number of stages (0 = fine-tune all) or 'all' (head only)")
    _check(m.bn in BN_POLICIES, "model.bn", m.bn, ", ".join(BN_POLICIES))
    _check(bool(m.weights), "model.weights", m.weights, "imagenet, none or a checkpoint path")
    _check(t.optimizer in OPTIMIZERS, "train.optimizer", t.optimizer, ", ".join(OPTIMIZERS))
    _check(t.lr > 0, "train.lr", t.lr, "a number > 0")
    _check(t.batch_size >= 2, "train.batch_size", t.batch_size, "2 or more")
    _check(t.local_epochs >= 1, "train.local_epochs", t.local_epochs, "1 or more")
    _check(t.local_steps is None or t.local_steps >= 1, "train.local_steps", t.local_steps,
           "null (use local_epochs) or 1 or more optimizer steps per round")
    _check(t.head_lr > 0, "train.head_lr", t.head_lr, "a number > 0")
    _check(t.feature_views >= 0, "train.feature_views", t.feature_views,
           "0 (the plain image) or 1 or more augmented views per image")
    _check(t.feature_views == 0 or d.augment, "train.feature_views", t.feature_views,
           "0 when data.augment is false (augmented views need augmentation; the plain image's "
           "features are exact without it)")
    _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "0 or more")
    _check(t.device in DEVICES, "train.device", t.device, ", ".join(DEVICES))
    _check(f.strategy in STRATEGIES, "federation.strategy", f.strategy, ", ".join(STRATEGIES))
    _check(f.rounds >= 1, "federation.rounds", f.rounds, "1 or more")
    _check(f.head_rounds is None or 0 <= f.head_rounds <= f.rounds, "federation.head_rounds",
           f.head_rounds,
           f"0 to federation.rounds ({f.rounds}): the head stage cannot be longer than the run")
    _check(not (m.weights == "none" and (m.freeze == "all" or f.head_rounds != 0)),
           "model.weights", m.weights, "imagenet or a checkpoint when only the head trains "
           "(model.freeze=all or federation.head_rounds other than 0): a head on random frozen "
           "features learns nothing; use --freeze 0 --head-rounds 0 to train from scratch")
    _check(f.head_start is None or f.head_start in HEAD_STARTS, "federation.head_start",
           f.head_start, ", ".join(HEAD_STARTS))
    private = config.privacy.dp != "none" or config.privacy.secagg
    _check(not (f.head_start == CLASS_MEANS and private),
           "federation.head_start", f.head_start,
           "none under DP or secure aggregation: each site's class sums of features would reach "
           "the server unprotected")
    _check(0 <= f.server_momentum < 1, "federation.server_momentum", f.server_momentum,
           "0 <= value < 1")
    _check(f.mu >= 0, "federation.mu", f.mu, "0 or more")
    _check(f.server_lr > 0, "federation.server_lr", f.server_lr, "a number > 0")
    _check(0 <= f.trim_fraction < 0.5, "federation.trim_fraction", f.trim_fraction,
           "0 <= value < 0.5")
    _check(0 < f.fraction_train <= 1, "federation.fraction_train", f.fraction_train,
           "0 < value <= 1")
    _check(f.patience >= 0, "federation.patience", f.patience, "0 (off) or more rounds")
    _check(f.selection in SELECTIONS, "federation.selection", f.selection, ", ".join(SELECTIONS))
    _check(0 <= f.smoothing < 1, "federation.smoothing", f.smoothing, "0 (off) <= value < 1")
    _check(f.lr_patience >= 0, "federation.lr_patience", f.lr_patience, "0 or more rounds")
    _check(0 < f.lr_factor < 1, "federation.lr_factor", f.lr_factor, "0 < value < 1")
    _check(f.min_lr >= 0, "federation.min_lr", f.min_lr, "0 or more")
    _check(f.round_timeout > 0, "federation.round_timeout", f.round_timeout, "seconds > 0")
    _check(f.norm_factor == 0 or f.norm_factor > 1, "federation.norm_factor", f.norm_factor,
           "0 (off) or a number > 1")
    _check(f.max_examples >= 1, "federation.max_examples", f.max_examples, "1 or more")
    _check(f.byzantine >= 0, "federation.byzantine", f.byzantine, "0 or more sites")
    _check(a.kind in ATTACKS, "attack.kind", a.kind, ", ".join(ATTACKS))
    _check(a.kind == "none" or a.sites >= 1, "attack.sites", a.sites,
           f"1 or more attacking sites (--attackers) with attack.kind={a.kind}")
    _check(a.kind != "none" or a.sites == 0, "attack.sites", a.sites,
           "0 without an attack (set attack.kind too)")
    _check(a.scale > 0, "attack.scale", a.scale, "a number > 0")
    _validate_privacy(config)
    _check(s.cpus_per_site > 0, "simulation.cpus_per_site", s.cpus_per_site, "a number > 0")
    _check(s.gpus_per_site is None or s.gpus_per_site >= 0, "simulation.gpus_per_site",
           s.gpus_per_site, "null (auto) or 0 or more")
    _check(e.folds == 0 or e.folds >= 2, "evidence.folds", e.folds, "0 (off) or 2 or more")
    _check(e.bootstrap >= 100, "evidence.bootstrap", e.bootstrap, "100 or more resamples")
    _check(e.gradcam_per_class >= 0, "evidence.gradcam_per_class", e.gradcam_per_class, "0 or more")
    _check(e.min_per_class >= 1, "evidence.min_per_class", e.min_per_class, "1 or more images")
    _check(0 <= config.seed <= MAX_SEED, "seed", config.seed, f"0 to {MAX_SEED}")
    modes, seeds, fractions = comparison_plan(config)
    _check(bool(modes) and all(m in MODES for m in modes) and len(set(modes)) == len(modes),
           "evidence.compare", e.compare,
           "all, or a comma-separated list of " + ", ".join(MODES) + " (each once)")
    _check(bool(seeds) and all(0 <= x <= MAX_SEED for x in seeds) and len(set(seeds)) == len(seeds),
           "evidence.seeds", e.seeds, f"comma-separated distinct seeds from 0 to {MAX_SEED}")
    _check(bool(fractions) and all(0 < x <= 1 for x in fractions), "evidence.train_fractions",
           e.train_fractions, "comma-separated numbers in (0, 1]")
    return config


def resolve(config: Config) -> Config:
    """A validated copy with every value derived from others decided, once, here: the rest of
    medfed reads it and never edits it. `data.image_size` defaults to the backbone's own input
    size, so the server, every site and every mode resize alike; `federation.head_start` is
    class-means unless DP or secure aggregation is on. (The sites of a natural
    partition come from the data, and the stages' split from `Stages.of_config`.)"""
    resolved = copy.deepcopy(validate(config))
    if resolved.data.image_size is None:
        from medfed.common.model import native_input_size  # timm: seconds, so after the checks

        resolved.data.image_size = native_input_size(resolved.model.backbone)
    if resolved.federation.head_start is None:
        private = resolved.privacy.dp != "none" or resolved.privacy.secagg
        resolved.federation.head_start = "none" if private else CLASS_MEANS
    return resolved


def check_sites(config: Config, *, sites: int, sampled: int | None = None,
                why: str | None = None) -> None:
    """What depends on the number of sites, once it is known (a simulation's partition, a
    deployment's sites.yaml): the attackers of a simulated attack, the three sites secure
    aggregation needs, and the malicious sites a robust strategy is told to tolerate, with
    `sampled` training replies per round (default: the sites `federation.fraction_train` samples;
    `why` says where a smaller number comes from)."""
    a, f = config.attack, config.federation
    if a.kind != "none":
        _check(a.sites < sites, "attack.sites", a.sites,
               f"1 to {sites - 1} attacking sites (fewer than the study's {sites} sites)")
    replies = max(1, round(f.fraction_train * sites)) if sampled is None else sampled
    if why is None:
        sampling = f", {replies} sampled per round (federation.fraction_train)"
        why = f"the study has {sites} sites" + (sampling if replies != sites else "")
    if config.privacy.secagg and replies < SECAGG_MIN_SITES:
        raise MedfedError(f"--secagg needs at least {SECAGG_MIN_SITES} sites training each round "
                          f"(with two, the sum less one's own update is the other's), but {why}: "
                          f"add sites or leave out --secagg")
    if f.strategy not in BYZANTINE_MINIMUM:
        return
    per_attacker, extra = BYZANTINE_MINIMUM[f.strategy]
    needed = per_attacker * f.byzantine + extra
    if replies < needed:
        raise MedfedError(
            f"federation.strategy={f.strategy} with federation.byzantine={f.byzantine} needs at "
            f"least {needed} sites training each round ({per_attacker}f + {extra}), but {why}: "
            + ("assume fewer malicious sites, add sites," if f.byzantine else "add sites")
            + " or choose another strategy"
        )


def comparison_plan(config: Config) -> tuple[list[str], list[int], list[float]]:
    """(modes, seeds, train fractions) from their comma-separated config values."""
    e = config.evidence
    modes = list(MODES) if e.compare.strip() == "all" else _items(e.compare, str, "evidence.compare")
    seeds = _items(e.seeds, int, "evidence.seeds") if e.seeds.strip() else [config.seed]
    fractions = sorted(set(_items(e.train_fractions, float, "evidence.train_fractions")))
    return modes, seeds, fractions


def _items(text: str, kind: type, key: str) -> list:
    try:
        return [kind(item.strip()) for item in str(text).split(",") if item.strip()]
    except ValueError:
        raise MedfedError(f"config key '{key}' has value {text!r}; expected comma-separated "
                          f"{kind.__name__} values") from None


def check_deployment(config: Config, *, sites: int, min_sites: int) -> None:
    """A study across real hospitals: no simulated attack; secure aggregation's three sites, and
    a robust strategy that can tolerate its assumed malicious sites, even when only `min_sites`
    sites train."""
    if config.attack.kind != "none" or config.attack.sites:
        raise MedfedError(f"attack.kind={config.attack.kind}: simulated attacks are for `medfed "
                          f"simulate` only; remove the attack section from the study's config")
    sampled = min(min_sites, max(1, round(config.federation.fraction_train * sites)))
    check_sites(config, sites=sites, sampled=sampled,
                why=f"only {sampled} are sure to (--min-sites {min_sites} of {sites} sites)")


def study_classes(config: Config) -> list[str]:
    """The deployed study's class list (`data.classes`), refusing fewer than two."""
    classes = [c.strip() for c in config.data.classes or []]
    if len(classes) < 2 or len(set(classes)) != len(classes) or not all(classes):
        raise MedfedError(
            f"data.classes={config.data.classes!r}: a study across hospitals must name its classes "
            f"in label order, e.g. data: {{classes: [normal, pneumonia]}} (two or more, no repeats)"
        )
    return classes


def _validate_privacy(config: Config) -> None:
    p, f = config.privacy, config.federation
    _check(p.dp in DP_MODES, "privacy.dp", p.dp, ", ".join(DP_MODES))
    _check(p.epsilon is None or p.epsilon > 0, "privacy.epsilon", p.epsilon, "a number > 0")
    _check(p.delta is None or 0 < p.delta < 1, "privacy.delta", p.delta, "0 < value < 1")
    _check(p.max_grad_norm > 0, "privacy.max_grad_norm", p.max_grad_norm, "a number > 0")
    _check(p.clip > 0, "privacy.clip", p.clip, "a number > 0")
    _check(p.noise_multiplier is None or p.noise_multiplier >= 0, "privacy.noise_multiplier",
           p.noise_multiplier, "0 or more")
    if p.secagg:
        _check(f.strategy in MEAN_STRATEGIES, "federation.strategy", f.strategy,
               f"{', '.join(MEAN_STRATEGIES)} with --secagg (the server sees only the weighted "
               f"sum of the updates; a median, trimmed mean or Krum needs each one)")
        _check(p.dp != "client", "privacy.dp", p.dp,
               "none or sample with --secagg (client-level DP clips each update at the server, "
               "which under secure aggregation sees only their sum)")
    if p.dp == "sample":
        _check(p.epsilon is not None or p.noise_multiplier is not None, "privacy.epsilon",
               p.epsilon, "a budget > 0 with --dp sample (or give --noise-multiplier)")
        _check(p.noise_multiplier is None or p.noise_multiplier > 0, "privacy.noise_multiplier",
               p.noise_multiplier, "a number > 0 with --dp sample (no noise is no privacy)")
        _check(f.strategy != "fedprox", "federation.strategy", f.strategy,
               "any strategy but fedprox with --dp sample (FedProx's proximal term adds a "
               "gradient that is not per-example, which DP-SGD cannot clip)")
        _check(config.model.bn == "frozen" or config.model.freeze == "all"
               or f.head_rounds == f.rounds, "model.bn", config.model.bn,
               "frozen with --dp sample when the run fine-tunes (DP-SGD cannot compute "
               "per-example gradients through BatchNorm's batch statistics); add --set "
               "model.bn=frozen, or train the head only (--freeze all)")
    if p.dp == "client":
        _check(p.noise_multiplier is not None, "privacy.noise_multiplier", p.noise_multiplier,
               "a number >= 0 with --dp client (the noise added to the sum of the clipped updates, "
               "in units of --clip)")
        _check(f.strategy in MEAN_STRATEGIES, "federation.strategy", f.strategy,
               f"{', '.join(MEAN_STRATEGIES)} with --dp client (its noise is calibrated to a mean "
               f"of the updates; a median or Krum has another sensitivity)")
        _check(f.fraction_train == 1, "federation.fraction_train", f.fraction_train,
               "1 with --dp client (epsilon is computed for every site in every round, with no "
               "credit for sampling)")
