"""Per-patch gradients under the Tail-Aware Loss (analysis/gradients.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from decoflow_core.analysis import gradients
from decoflow_core.config import make_config
from decoflow_core.model import DeCoFlow


def tiny_flow(**options) -> DeCoFlow:
    torch.manual_seed(0)
    return DeCoFlow(dim=8, n_dcs=2, n_acl=1, rank=2, hidden_ratio=1.0, **options)


def test_tail_share_on_a_hand_made_batch():
    nll = [5.0, 1.0, 2.0, 1.0]
    grads = [3.0, 1.0, 1.0, 1.0]
    assert gradients.tail_share(grads, nll, top_k=0.25) == pytest.approx(0.5)  # patch 0 carries 3 of 6
    assert gradients.tail_share(grads, nll, top_k=0.5) == pytest.approx(4 / 6)  # patches 0 and 2


def test_expected_tail_weight_of_eq_21():
    assert gradients.expected_tail_weight(0.0, 0.02) == pytest.approx(0.02)
    assert gradients.expected_tail_weight(1.0, 0.02) == pytest.approx(1.0)
    assert gradients.expected_tail_weight(0.7, 0.02) == pytest.approx(0.706)


def test_pure_tail_loss_on_a_patchwise_flow_has_gradient_only_on_the_worst_patch():
    # without SCM and the DCS context every patch is modelled alone, so a loss on one patch's NLL
    # has a gradient on that patch's features only
    model = tiny_flow(use_scm=False, use_context=False)
    model.add_task("a")
    model.set_task("a")
    x = torch.randn(2, 8, 4, 4)
    config = make_config("smoke").replace(lambda_tail=1.0, top_k=1 / 32)
    nll, grad = gradients.patch_feature_gradients(model, x, config)
    assert nll.shape == grad.shape == (32,)
    assert np.count_nonzero(grad) == 1 and np.argmax(grad) == np.argmax(nll)
    nll_plain, grad_plain = gradients.patch_feature_gradients(model, x, config.replace(lambda_tail=0.0))
    np.testing.assert_allclose(nll_plain, nll)
    assert np.count_nonzero(grad_plain) == 32
    assert gradients.tail_share(grad, nll, 1 / 32) == 1.0 > gradients.tail_share(grad_plain, nll, 1 / 32)
