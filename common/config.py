"""The one typed medfed configuration: every default lives here.

Precedence, lowest first: these defaults, a YAML file (`--config`), CLI options, `--set key=value`.
The resolved config is validated once (`validate`) and then travels unchanged: to the
server app directly, and to every site as JSON inside each round's ConfigRecord, so
simulation and deployment configure sites the same way.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medfed.common.errors import MedfedError
from medfed.common.medmnist_catalogue import DATASETS

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "fedmedian", "fedtrimmedavg",
              "krum", "multikrum", "bulyan")
# Byzantine-robust strategies and the fewest training replies per round each needs for
# `federation.byzantine` = f assumed attackers: Krum/MultiKrum score each update by its n - f - 2
# nearest others (Blanchard et al. 2017: n >= 2f + 3); Bulyan (El Mhamdi et al. 2018): n >= 4f + 3.
BYZANTINE_MINIMUM = {"krum": (2, 3), "multikrum": (2, 3), "bulyan": (4, 3)}
ATTACKS = ("none", "sign-flip", "scaled", "noise", "label-flip")
PARTITIONS = ("iid", "dirichlet", "quantity", "pathological", "natural")
EQUALIZERS = ("none", "clahe", "hist")
MODES = ("federated", "centralized", "local", "scratch", "classical")
OPTIMIZERS = ("adam", "sgd")
BN_POLICIES = ("avg", "local", "frozen")
DP_MODES = ("none", "sample", "client")
# Strategies whose aggregate is a mean of the updates: the only ones client-level DP calibrates
# its noise for (FedAvgM, FedAdam and FedYogi then post-process the noised mean).
MEAN_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi")
DEVICES = ("auto", "cpu", "cuda")
SELECTIONS = ("auc", "loss")
MEDMNIST_RESOLUTIONS = (28, 64, 128, 224)
# Seeds feed numpy (non-negative only) and torch (a site derives its own from seed x 100003 plus
# the round, which must stay below 2**64).
MAX_SEED = 2**32 - 1


@dataclass
class DataConfig:
    # A hospital's own data: a folder with one subfolder per class, or a CSV manifest
    # (path,label[,site][,patient_id]). When set, `dataset`/`resolution`/`data_dir` are unused.
    path: str | None = None
    dataset: str = "pneumoniamnist"
    # Class names in label order (a YAML list). A deployed server holds no data, so a study run
    # across hospitals names its classes here; simulations take them from the data.
    classes: list[str] | None = None
    # Which MedMNIST file to read: 28 -> {dataset}.npz, otherwise {dataset}_{resolution}.npz.
    resolution: int = 28
    # None: $MEDFED_DATA_DIR, else the user cache directory (see common.medmnist).
    data_dir: str | None = None
    # Model input side in pixels; images are resized to it. None: the backbone's native size
    # (224, InceptionV3 299), where its ImageNet features are best (docs/BENCHMARKS.md: a head on
    # 224 px features of 64 px BreastMNIST files beats one on 64 px features by ~0.05 AUC).
    image_size: int | None = None
    # Histogram equalization before normalization: none, clahe (contrast-limited, local) or hist.
    equalize: str = "none"
    augment: bool = True
    # Frame of a multi-frame DICOM; None: the middle one.
    frame: int | None = None
    # Leave out unreadable files (and say how many) instead of refusing to train.
    skip_bad: bool = False


@dataclass
class PartitionConfig:
    scheme: str = "dirichlet"
    sites: int = 5
    # Dirichlet concentration: label skew for `dirichlet`, size skew for `quantity`. Smaller = more skew.
    alpha: float = 0.5
    # Classes each site holds under `pathological`.
    labels_per_site: int = 1
    # A site with fewer examples than this (before its 70/15/15 split) refuses the run.
    min_examples: int = 40


@dataclass
class ModelConfig:
    backbone: str = "tf_efficientnet_lite0"
    # "imagenet", "none" (from scratch) or a path to a local checkpoint.
    weights: str = "imagenet"
    # Stem plus the first N stages are frozen; "all" trains the head only (on cached frozen
    # features: the default, best and cheapest in docs/BENCHMARKS.md); "0" fine-tunes everything.
    freeze: str = "all"
    # BatchNorm of the trainable part: "avg" sends its statistics to be averaged, "local" keeps
    # BatchNorm weights and statistics at each site (FedBN), "frozen" keeps every BatchNorm at its
    # pretrained values (what DP-SGD needs: a per-example gradient through batch statistics does
    # not exist).
    bn: str = "avg"


@dataclass
class TrainConfig:
    optimizer: str = "adam"
    lr: float = 1e-4
    batch_size: int = 32
    local_epochs: int = 1
    # Optimizer steps per round (cycling through the site's data); None: `local_epochs` passes.
    # Steps make a 37-image site and a 3,000-image site do the same amount of work per round.
    local_steps: int | None = 20
    # Learning rate of the head stage (the classifier alone, on cached frozen features); the top
    # stages are then fine-tuned from there at `lr` (linear probe, then fine-tune).
    head_lr: float = 3e-3
    # Augmented views per training image whose frozen features are cached for the head stage;
    # 0: the plain image only (exact, no augmentation in the head stage).
    feature_views: int = 0
    weight_decay: float = 1e-4
    device: str = "auto"


@dataclass
class FederationConfig:
    strategy: str = "fedavg"
    rounds: int = 10
    # The first rounds train the classifier alone on each site's cached frozen features (a few KB
    # on the wire); the remaining rounds fine-tune the unfrozen top stages. With `model.freeze:
    # all` every round is a head round. None: half the rounds (linear probe, then fine-tune).
    head_rounds: int | None = None
    # FedProx proximal weight.
    mu: float = 0.01
    # Server learning rate of FedAdam/FedYogi.
    server_lr: float = 0.01
    # Server momentum of FedAvgM.
    server_momentum: float = 0.9
    # Fraction cut from each end by FedTrimmedAvg.
    trim_fraction: float = 0.2
    fraction_train: float = 1.0
    # Early stopping on the aggregated validation loss; 0 disables it.
    patience: int = 5
    # Rounds are judged (early stopping, learning-rate reduction, the final model) by the
    # aggregated validation loss smoothed over rounds: this weight of the past in an exponential
    # moving average; 0 judges each round alone.
    smoothing: float = 0.5
    # What rounds are judged by: "auc" (the sites' validation AUC, example-weighted; their loss
    # where no site's validation split holds two classes) or "loss".
    selection: str = "auc"
    # Learning-rate reduction on plateau of the same loss.
    lr_patience: int = 2
    lr_factor: float = 0.5
    min_lr: float = 1e-6
    # Seconds the server waits for the sites' replies in one round.
    round_timeout: float = 3600.0
    # A site's update whose distance from the global model is more than this many times the
    # round's median is rejected (with 3 or more replies); 0 disables the check.
    norm_factor: float = 10.0
    # Most training examples any site may claim (once a site has declared its training-set size
    # in an evaluation reply, it may claim no more than that).
    max_examples: int = 10_000_000
    # Krum, MultiKrum and Bulyan: the number of malicious sites they assume (f). MultiKrum averages
    # the n - f best-scored updates of each round.
    byzantine: int = 0


@dataclass
class AttackConfig:
    """A simulated attack (`medfed simulate` only; a deployed study refuses any). The first
    `sites` virtual sites attack:

    * sign-flip: their update is reversed and scaled, local' = global - scale * (local - global);
    * scaled: local' = global + scale * (local - global);
    * noise: their update is replaced by Gaussian noise, per tensor of standard deviation
      scale x the root mean square of their real update;
    * label-flip: every training label of theirs becomes the next class, (y + 1) mod classes,
      in every mode that trains on their data.

    sign-flip, scaled and noise act on the trainable parameters they send back; BatchNorm
    statistics are left as trained."""

    kind: str = "none"
    sites: int = 0
    scale: float = 4.0


@dataclass
class PrivacyConfig:
    """Differential privacy (common/privacy.py).

    * sample: DP-SGD at every site (Opacus): each site's training examples are protected by
      (epsilon, delta)-DP over the whole run; the noise for `epsilon` over the planned rounds is
      computed up front at each site, whose spend is kept in its own state directory.
    * client: each site's whole update is clipped to `clip` and the server adds Gaussian noise of
      `noise_multiplier` x `clip` to their sum (Flower's server-side fixed clipping): each site's
      participation is protected; epsilon is reported per round."""

    dp: str = "none"
    # sample: the budget per site over the run (the noise is computed from it).
    epsilon: float | None = None
    # None: 1e-5, or lower at a site where 1e-5 is not below a tenth of 1/(its training examples).
    delta: float | None = None
    # sample: each example's gradient is clipped to this L2 norm.
    max_grad_norm: float = 1.0
    # sample: instead of epsilon (with epsilon too it must be enough for it); client: required.
    noise_multiplier: float | None = None
    # client: each site's update (its change to the global model) is clipped to this L2 norm.
    clip: float = 1.0
    # Secure aggregation (SecAgg+); see the README's privacy section for why it is refused.
    secagg: bool = False


@dataclass
class SimulationConfig:
    # CPU cores given to each virtual site; 2 cores and 1 per site run two sites at a time.
    cpus_per_site: float = 1.0
    # None: share the GPU among the sites when the machine has one, none otherwise.
    gpus_per_site: float | None = None


@dataclass
class EvidenceConfig:
    # Modes trained on the same sites, seeds and test sets: comma-separated names or "all".
    # Scratch (every layer from random weights, at the backbone's 224 px) takes roughly an hour
    # on two CPU cores (extrapolated from `medfed bench`'s full-model rounds), so it runs only
    # when asked for ("all").
    compare: str = "federated,centralized,local,classical"
    # Comma-separated seeds; empty: the top-level seed only.
    seeds: str = ""
    # k-fold cross-validation of every site's split; 0: the plain 70/15/15 split.
    folds: int = 0
    # Comma-separated fractions of each site's training data (data-efficiency study).
    train_fractions: str = "1.0"
    # Bootstrap resamples behind each 95% confidence interval.
    bootstrap: int = 1000
    # Grad-CAM overlays per site and class (the most confident right and wrong answers).
    gradcam_per_class: int = 2
    # A test split with fewer images than this of some class has no estimable AUC, sensitivity,
    # specificity, precision, F1 or balanced accuracy (shown as "not estimable (1 malignant
    # image)", left out of paired tests), rather than a number with a meaningless interval.
    min_per_class: int = 5


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    seed: int = 0
    # Run directory; None picks runs/<dataset>-<strategy>-<time>.
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Config:
        return from_dict(json.loads(text))


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type or say what was expected."""
    allowed = [a for a in typing.get_args(hint)] or [hint]
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            # YAML 1.1 reads `1e-4` (no dot) as a string; it is the form people type.
            try:
                number = float(value)
            except (ValueError, OverflowError):  # not a number; an int beyond float range
                number = math.inf if isinstance(value, int) else None
            if number is not None:
                if not math.isfinite(number):
                    # `.inf`, `.nan`, `1e400`: no setting means them (an infinite learning rate
                    # or alpha passes every "> 0" check and silently ruins the run).
                    raise MedfedError(f"config key '{key}' has value {value!r}; expected a finite number")
                return number
        if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if typing.get_origin(kind) is list and isinstance(value, list) and all(
                isinstance(item, (str, int, float)) and not isinstance(item, bool) for item in value):
            # A list of names (class names may hold commas, e.g. BreastMNIST's "normal, benign").
            return [str(item) for item in value]
    names = " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in allowed)
    raise MedfedError(f"config key '{key}' has value {value!r}; expected {names}")


def from_dict(raw: dict[str, Any], *, origin: str = "config") -> Config:
    """Build a Config from a nested dict, refusing unknown keys by name."""
    if not isinstance(raw, dict):
        raise MedfedError(f"{origin} must be a mapping of sections, got {type(raw).__name__}")
    config = Config()
    sections = _sections()
    for name, value in raw.items():
        if name not in sections:
            raise MedfedError(
                f"{origin}: unknown key '{name}'; allowed top-level keys: {', '.join(sections)}"
            )
        hint = sections[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise MedfedError(f"{origin}: '{name}' must be a mapping, got {value!r}")
            for key, item in value.items():
                set_value(config, f"{name}.{key}", item, origin=origin)
        else:
            set_value(config, name, value, origin=origin)
    return config


def set_value(config: Config, dotted: str, value: Any, *, origin: str = "--set") -> None:
    """Set one `section.key` (or top-level key) with type checking."""
    parts = dotted.split(".")
    sections = _sections()
    if parts[0] not in sections:
        raise MedfedError(
            f"{origin}: unknown key '{dotted}'; allowed top-level keys: {', '.join(sections)}"
        )
    hint = sections[parts[0]]
    if dataclasses.is_dataclass(hint):
        section = getattr(config, parts[0])
        hints = typing.get_type_hints(hint)
        if len(parts) != 2 or parts[1] not in hints:
            raise MedfedError(
                f"{origin}: unknown key '{dotted}'; keys in '{parts[0]}': "
                + ", ".join(f"{parts[0]}.{k}" for k in hints)
            )
        setattr(section, parts[1], _coerce(dotted, value, hints[parts[1]]))
    else:
        if len(parts) != 1:
            raise MedfedError(f"{origin}: unknown key '{dotted}'")
        setattr(config, dotted, _coerce(dotted, value, hint))


def parse_assignment(text: str) -> tuple[str, Any]:
    """`federation.rounds=20` -> ("federation.rounds", 20); values are read as YAML scalars."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise MedfedError(f"--set expects key=value (e.g. federation.rounds=20), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except _YAML_ERRORS as exc:
        raise MedfedError(f"--set {key}: cannot read value {raw!r} ({_yaml_problem(exc)})") from None
    return key.strip(), value


def load_yaml(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise MedfedError(f"config file {path} does not exist; pass an existing YAML file to --config")
    return from_dict(read_yaml(path, what="config file") or {}, origin=str(path))


def read_yaml(path: Path, *, what: str) -> Any:
    """A YAML file's content, or one line saying why it cannot be read: not text (a binary file,
    not UTF-8), not YAML, or not readable at all."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MedfedError(
            f"{what} {path} is not a YAML text file (byte {exc.object[exc.start]:#04x} at offset "
            f"{exc.start} is not UTF-8 text; is it a binary file?)"
        ) from None
    except OSError as exc:
        raise MedfedError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except _YAML_ERRORS as exc:
        raise MedfedError(f"{what} {path} is not valid YAML: {_yaml_problem(exc)}") from None


# PyYAML's safe loader also fails with plain Python errors on some text: an impossible date
# (`2024-13-45` is read as a timestamp: ValueError), an explicit tag with a bad value (`!!int x`,
# `!!bool x`, `!!timestamp x`: ValueError, KeyError, AttributeError, IndexError) or nesting deeper
# than the interpreter's stack (RecursionError). All are the text's fault, so all are reasons.
_YAML_ERRORS = (yaml.YAMLError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                RecursionError)


def _yaml_problem(exc: Exception) -> str:
    """PyYAML's multi-line message as one line: the problem and where."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if not isinstance(exc, yaml.YAMLError):
        return "a value cannot be read: " + " ".join(f"{type(exc).__name__}: {exc}".split())
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if problem is None:
        return " ".join(str(exc).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


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


def check_sites(config: Config, *, sites: int, sampled: int | None = None,
                why: str | None = None) -> None:
    """What depends on the number of sites, once it is known (a simulation's partition, a
    deployment's sites.yaml): the attackers of a simulated attack, and the malicious sites a
    robust strategy is told to tolerate with `sampled` training replies per round (default: the
    sites `federation.fraction_train` samples; `why` says where a smaller number comes from)."""
    a, f = config.attack, config.federation
    if a.kind != "none":
        _check(a.sites < sites, "attack.sites", a.sites,
               f"1 to {sites - 1} attacking sites (fewer than the study's {sites} sites)")
    if f.strategy not in BYZANTINE_MINIMUM:
        return
    replies = max(1, round(f.fraction_train * sites)) if sampled is None else sampled
    per_attacker, extra = BYZANTINE_MINIMUM[f.strategy]
    needed = per_attacker * f.byzantine + extra
    if replies < needed:
        if why is None:
            why = f"the study has {sites} sites" + (
                f", {replies} sampled per round (federation.fraction_train)" if replies != sites else "")
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
    """A study across real hospitals: no simulated attack, and a robust strategy that can
    tolerate its assumed malicious sites even when only `min_sites` sites train."""
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
    _check(not p.secagg, "privacy.secagg", p.secagg,
           "false: Flower 1.42's SecAgg+ runs only on its legacy strategy API (configure_fit / "
           "aggregate_fit over four message rounds), which medfed's Message-API strategy does not "
           "use; see the README's privacy section")
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
