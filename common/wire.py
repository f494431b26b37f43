"""What travels between a site and the server: the trainable part of the model, nothing else.

In the head stage that is the classifier alone; in the fine-tune stage, every unfrozen layer.

The frozen lower layers are rebuilt identically at every site from the same weights and seed,
so they never go on the wire. BatchNorm running statistics of the trainable part travel with
`bn: avg` (and are averaged, never fed to a server optimizer); with `bn: local` every BatchNorm
tensor of the trainable part stays at the site (FedBN). `num_batches_tracked` never travels:
it is an int64 counter that averaging would corrupt and that momentum-based BatchNorm ignores.
"""

from __future__ import annotations

from flwr.app import ArrayRecord
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medfed.common.model import classifier_keys
from medfed.common.schedule import FINETUNE, HEAD

BN_STATISTICS = ("running_mean", "running_var")


def _trainable_batchnorms(model: nn.Module) -> dict[str, _BatchNorm]:
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and any(p.requires_grad for p in module.parameters())
    }


def exchanged_keys(model: nn.Module, *, bn: str, stage: str = FINETUNE) -> list[str]:
    """State-dict keys that go on the wire in a stage, in state-dict order."""
    if stage == HEAD:
        head = classifier_keys(model)
        return [k for k in model.state_dict() if k in head]
    batchnorms = _trainable_batchnorms(model)
    keys = {name for name, p in model.named_parameters() if p.requires_grad}
    if bn == "avg":
        keys |= {f"{name}.{stat}" for name in batchnorms for stat in BN_STATISTICS}
    else:
        keys -= {f"{name}.{p}" for name, m in batchnorms.items() for p, _ in m.named_parameters()}
    return [k for k in model.state_dict() if k in keys]


def statistic_keys(keys: list[str]) -> list[str]:
    """The exchanged keys that are BatchNorm statistics, not parameters."""
    return [k for k in keys if k.rsplit(".", 1)[-1] in BN_STATISTICS]


def local_keys(model: nn.Module, *, bn: str) -> list[str]:
    """Trainable-part state a site keeps between rounds because it never travels (FedBN)."""
    if bn == "avg":
        return []
    return [
        f"{name}.{key}" for name, module in _trainable_batchnorms(model).items()
        for key in module.state_dict() if key != "num_batches_tracked"
    ]


def to_record(model: nn.Module, keys: list[str]) -> ArrayRecord:
    state = model.state_dict()
    return ArrayRecord({k: state[k].detach().cpu() for k in keys})


def load_record(model: nn.Module, record: ArrayRecord, *, keys: list[str]) -> None:
    """Load exactly the expected keys; anything else means the two sides disagree on the model."""
    received = set(record.keys())
    if received != set(keys):
        missing = sorted(set(keys) - received)[:3]
        extra = sorted(received - set(keys))[:3]
        raise ValueError(
            f"received arrays do not match this model's exchanged keys "
            f"(missing e.g. {missing}, unexpected e.g. {extra}); server and site configs differ"
        )
    model.load_state_dict(record.to_torch_state_dict(), strict=False)


def record_bytes(record: ArrayRecord) -> int:
    """Serialized payload size of the arrays as they are sent."""
    return sum(len(array.data) for array in record.values())

