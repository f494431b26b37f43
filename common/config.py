"""The one typed medfed configuration: every default lives here.

Precedence, lowest first: these defaults, a YAML file (`--config`), CLI options, `--set key=value`
(read by common/config_loading.py). The resolved config is validated once
(`config_checks.validate`) and then travels unchanged: to the server app directly, and to every
site as JSON inside each round's ConfigRecord, so simulation and deployment configure sites the
same way.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

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
# Secure aggregation hides a site's update only among three or more: with two, the sum less one's
# own update is the other's.
SECAGG_MIN_SITES = 3
DEVICES = ("auto", "cpu", "cuda")
SELECTIONS = ("auc", "loss")
# Where the head stage starts (common/head_start.py).
CLASS_MEANS = "class-means"
HEAD_STARTS = (CLASS_MEANS, "none")
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
    # Where the head stage starts: "class-means" (each site sends its per-class sums of frozen
    # features once; the head starts as the nearest-class-mean rule and trains on features
    # centered on their mean over all sites) or "none" (timm's random head, raw features).
    # None: class-means, except under DP or secure aggregation, which would not protect the sums.
    head_start: str | None = None
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
    # Secure aggregation (Flower's SecAgg+; with DP-SGD or without DP): the
    # server sees only the weighted sum of the sites' updates (README's privacy section).
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
        # Imported here, not above: the loader builds Configs, so it imports this module first.
        from medfed.common.config_loading import from_dict

        return from_dict(json.loads(text))
