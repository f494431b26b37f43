"""Differential privacy: DP-SGD at a site with a run-long budget, and the accounting of both kinds.

Sample level (`privacy.dp: sample`): every site trains with Opacus' DP-SGD (per-example gradients
clipped to `max_grad_norm`, Gaussian noise, Poisson sampling). The noise multiplier is decided
once per site from the budget over the run as planned (rounds x steps per round) with Opacus'
own `get_noise_multiplier`. What a site has spent lives in a ledger file in its own state
directory, one per study: it survives a restarted site process and a resumed server, and a
site whose next round would go past the budget refuses to train. The ledger is the history
Opacus' RDP accountant recorded while the site trained; epsilon is that accountant's.

Client level (`privacy.dp: client`): each site's update is clipped and the server noises the
sum (Flower's DifferentialPrivacyServerSideFixedClipping); `client_epsilon` accounts for it
with the same RDP analysis, one Gaussian release per round.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from medfed.common.config import Config
from medfed.common.errors import MedfedError
from medfed.common.files import write_bytes_atomic

DEFAULT_DELTA = 1e-5


def default_delta(examples: int) -> float:
    """1e-5, or a tenth of 1/n where that is smaller: delta must stay well below the chance of
    picking any one of the site's n examples."""
    return min(DEFAULT_DELTA, 0.1 / examples)


@dataclass(frozen=True)
class SitePlan:
    """A site's DP-SGD settings for a whole run, decided before its first step."""

    noise_multiplier: float
    sample_rate: float          # Poisson sampling: each example joins a batch with this chance
    max_grad_norm: float
    delta: float
    epsilon: float | None       # the budget; None when only a noise multiplier was given
    steps_per_round: int
    planned_steps: int


# Opacus is imported where it is used: it loads torch.distributed (over a second), and most of a
# site's messages (no DP-SGD) never need it.


def site_plan(config: Config, *, examples: int) -> SitePlan:
    """The plan of a site with `examples` training examples, or one line saying what is wrong."""
    from opacus.accountants.utils import get_noise_multiplier

    p, t = config.privacy, config.train
    batches = math.ceil(examples / t.batch_size)
    sample_rate = 1 / batches  # what Opacus' DPDataLoader samples with for this loader
    steps_per_round = t.local_steps if t.local_steps is not None else t.local_epochs * batches
    planned = config.federation.rounds * steps_per_round
    delta = default_delta(examples) if p.delta is None else p.delta
    if delta >= 1 / examples:
        raise MedfedError(
            f"privacy.delta={delta:g} is not below 1/n = {1 / examples:.2g} for a site with "
            f"{examples} training examples (such a delta allows leaking a whole example); use "
            f"--delta {default_delta(examples):.0e} or leave it unset")
    if p.noise_multiplier is None:
        noise = get_noise_multiplier(target_epsilon=p.epsilon, target_delta=delta,
                                     sample_rate=sample_rate, steps=planned, accountant="rdp")
    else:
        noise = p.noise_multiplier
        if p.epsilon is not None:
            spent = epsilon_of([(noise, sample_rate, planned)], delta=delta)
            if spent > p.epsilon:
                needed = get_noise_multiplier(target_epsilon=p.epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=planned,
                                              accountant="rdp")
                raise MedfedError(
                    f"--noise-multiplier {noise:g} is too small for epsilon={p.epsilon:g} over the "
                    f"planned {planned} steps ({config.federation.rounds} rounds x "
                    f"{steps_per_round}) of a site with {examples} training examples: it would "
                    f"spend epsilon={spent:.2f}; use at least {needed:.3f}, or leave it unset to "
                    f"have it computed")
    return SitePlan(noise_multiplier=float(noise), sample_rate=sample_rate,
                    max_grad_norm=p.max_grad_norm, delta=delta, epsilon=p.epsilon,
                    steps_per_round=steps_per_round, planned_steps=planned)


def epsilon_of(history: list[tuple[float, float, int]], *, delta: float) -> float:
    """Epsilon after these (noise multiplier, sample rate, steps) releases: Opacus' RDP accountant."""
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [tuple(entry) for entry in history]
    with warnings.catch_warnings():
        # Large noise puts the best order at the edge of Opacus' grid; the bound stays valid.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(accountant.get_epsilon(delta))


def client_epsilon(noise_multipliers: list[float], *, delta: float) -> float:
    """Client-level epsilon after one Gaussian release of the clipped sum per round, every site in
    every round (no credit for sampling); a round's multiplier is the noise over the clip."""
    if any(z == 0 for z in noise_multipliers):
        return math.inf
    return epsilon_of([(z, 1.0, 1) for z in noise_multipliers], delta=delta)


class BudgetSpent(MedfedError):
    """A site's next round would spend more than its budget; it trains no more in this study."""


class Ledger:
    """What one site has spent in one study: a file in the site's own state directory.

    It holds every release as it happened, (noise multiplier, sample rate, steps), so a study
    resumed under other settings (more rounds, another budget) is accounted over its whole
    history, and the budget check holds whatever changed."""

    def __init__(self, folder: Path, *, study: str, plan: SitePlan) -> None:
        self.file = folder / f"privacy-{study}.json"
        self.plan = plan
        self.history: list[list] = []
        if self.file.is_file():
            self.history = json.loads(self.file.read_text())["history"]

    @property
    def steps(self) -> int:
        return sum(int(entry[2]) for entry in self.history)

    @property
    def epsilon(self) -> float:
        return epsilon_of(self.history, delta=self.plan.delta)

    def check(self, *, site: str) -> None:
        """Refuse a round that would take the spend past the budget."""
        if self.plan.epsilon is None:
            return
        after = epsilon_of([*self.history, (self.plan.noise_multiplier, self.plan.sample_rate,
                                            self.plan.steps_per_round)], delta=self.plan.delta)
        if after > self.plan.epsilon * 1.01:  # get_noise_multiplier's own tolerance
            raise BudgetSpent(
                f"site {site}: privacy budget spent (epsilon {self.epsilon:.2f} of "
                f"{self.plan.epsilon:g} after {self.steps} steps; another round would reach "
                f"{after:.2f}); it trains no more in this study")

    def record(self, history: list[tuple[float, float, int]]) -> None:
        """Add a round's releases, written (atomically) before anything is sent back."""
        self.history.extend([float(z), float(q), int(n)] for z, q, n in history)
        self.file.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.file, json.dumps(
            {"plan": asdict(self.plan), "history": self.history}).encode())

    def metrics(self) -> dict[str, float]:
        """The site's spend as it reports it each round."""
        return {"epsilon": self.epsilon, "delta": self.plan.delta,
                "noise-multiplier": self.plan.noise_multiplier,
                "max-grad-norm": self.plan.max_grad_norm, "sample-rate": self.plan.sample_rate,
                "steps": self.steps, "budget": math.nan if self.plan.epsilon is None
                else self.plan.epsilon}


def make_private(module, optimizer, loader, *, plan: SitePlan, generator):
    """Opacus' DP-SGD around a plain training setup: (module, optimizer, loader, engine).

    Opacus' `secure_mode` (a cryptographic generator) needs torchcsprng, which has no build for
    this torch; the noise comes from torch's generator seeded from the operating system's
    randomness (the caller's `generator`), so Opacus' warning about it is not repeated each round."""
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
    invalid = ModuleValidator.validate(module, strict=False)
    if invalid:
        raise MedfedError(
            f"DP-SGD cannot train this model's trainable part: {invalid[0]}; train the head only "
            f"(--freeze all) or freeze BatchNorm (--set model.bn=frozen)")
    for layer in module.modules():
        if getattr(layer, "inplace", False):
            # Opacus' backward hooks see each layer's output; an in-place activation (timm's
            # SiLU/ReLU) would overwrite it, which autograd forbids.
            layer.inplace = False
    module, optimizer, loader = engine.make_private(
        module=module, optimizer=optimizer, data_loader=loader,
        noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
        poisson_sampling=True, noise_generator=generator)
    return module, optimizer, loader, engine
