"""The device settings: full precision and plain copies on the CPU; on a GPU, bfloat16 where it is
supported and float16 with loss scaling where it is not."""

from __future__ import annotations

import pytest
import torch

from medfed.common import device as devices


def test_the_cpu_computes_in_full_precision_with_plain_copies():
    cpu = torch.device("cpu")
    assert devices.amp_dtype(cpu) is None and not devices.needs_loss_scaling(cpu)
    assert devices.loader_options(cpu) == {"pin_memory": False}
    batch = torch.zeros(2, 3, 8, 8)
    assert devices.place_batch(batch, cpu).is_contiguous()  # no channels-last on the CPU
    with devices.autocast(cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert devices.pick_device("cpu") == cpu


@pytest.mark.parametrize("bf16, dtype, scaled", [(True, torch.bfloat16, False),
                                                 (False, torch.float16, True)])
def test_a_gpu_takes_bfloat16_where_it_can(monkeypatch, bf16, dtype, scaled):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    cuda = torch.device("cuda")
    assert devices.amp_dtype(cuda) == dtype
    assert devices.needs_loss_scaling(cuda) is scaled
    assert devices.needs_loss_scaling(cuda, enabled=False) is False  # DP-SGD: full precision
    assert devices.loader_options(cuda) == {"pin_memory": True}
