"""What travels between a site and the server: the trainable part of the model, nothing else.

In the head stage that is the classifier alone; in the fine-tune stage, every unfrozen layer.

The frozen lower layers are rebuilt identically at every site from the same weights and seed,
so they never go on the wire. BatchNorm running statistics of the trainable part travel with
`bn: avg` (and are averaged, never fed to a server optimizer); with `bn: local` every BatchNorm
tensor of the trainable part stays at the site (FedBN). `num_batches_tracked` never travels:
it is an int64 counter that averaging would corrupt and that momentum-based BatchNorm ignores.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medfed.common.schedule import FINETUNE, HEAD

BN_STATISTICS = ("running_mean", "running_var")


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier (timm's `get_classifier()`), wherever the model keeps it."""
    head = model.get_classifier()
    return {f"{name}.{key}" for name, module in model.named_modules() if module is head
            for key in module.state_dict()}


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


def linear_keys(keys) -> tuple[str, str] | None:
    """(weight key, bias key) when `keys` are a linear layer's two, else None."""
    keys = list(keys)
    weights = [k for k in keys if k.endswith(".weight")]
    if len(keys) != 2 or len(weights) != 1:
        return None
    bias = weights[0].removesuffix("weight") + "bias"
    return (weights[0], bias) if bias in keys else None


def linear_classifier(record: ArrayRecord, *, num_classes: int) -> nn.Linear | None:
    """The classifier a head-stage record holds, as a linear layer of its own, when it is one (a
    weight of `num_classes` rows and their biases); None when the record holds anything else."""
    keys = linear_keys(record.keys())
    if keys is None:
        return None
    weight, bias = (record[k].numpy() for k in keys)
    if weight.ndim != 2 or weight.shape[0] != num_classes or bias.shape != (num_classes,):
        return None
    layer = nn.Linear(weight.shape[1], num_classes)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    return layer


def linear_record(layer: nn.Linear, *, keys: list[str]) -> ArrayRecord:
    """A linear classifier's record under its keys in the model (`keys`, in their order)."""
    weight, _ = linear_keys(keys)
    return ArrayRecord({k: (layer.weight if k == weight else layer.bias).detach().cpu()
                        for k in keys})


def record_bytes(record: ArrayRecord) -> int:
    """Serialized payload size of the arrays as they are sent."""
    return sum(len(array.data) for array in record.values())

