"""The kit's AdamP (optim.py) against timm's, bit for bit, on the flow it trains."""
from __future__ import annotations

import pytest
import torch
from timm.optim import AdamP as TimmAdamP

from decoflow_core.config import make_config
from decoflow_core.learners import make_learner
from decoflow_core.losses import training_loss
from decoflow_core.optim import AdamP


def trained(optimizer_class, weight_decay: float, later_task: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    config = make_config("smoke", {"n_dcs": "3"})
    model = make_learner("decoflow", config, 12, "cpu").model
    model.add_task("a")
    if later_task:  # only the second task's adapters train, the base frozen
        model.freeze_base()
        model.add_task("b")
    model.set_task("b" if later_task else "a")
    params = model.trainable_parameters()
    optimizer = optimizer_class(params, lr=1e-2, weight_decay=weight_decay)
    x = torch.randn(24, 12, 6, 6, generator=torch.Generator().manual_seed(1))
    model.train()
    for step in range(8):
        loss = training_loss(model, x[(step % 3) * 8:(step % 3 + 1) * 8], config)
        optimizer.zero_grad()
        loss.backward()
        if step == 5:
            params[0].grad = None  # a tensor without a gradient skips the step, its count falls behind
        optimizer.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("later_task", [False, True])
def test_adamp_equals_timm_bit_for_bit(weight_decay, later_task):
    ours, timm = trained(AdamP, weight_decay, later_task), trained(TimmAdamP, weight_decay, later_task)
    assert len(ours) == len(timm) > 10
    assert all(torch.equal(a, b) for a, b in zip(ours, timm))
    assert any(not torch.equal(a, b) for a, b in zip(ours, trained(AdamP, weight_decay + 0.1, later_task)))
