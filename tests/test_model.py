"""Properties of the DeCoFlow model: invertibility, exact log-det, zero forgetting, bookkeeping."""
import copy
import math

import pytest
import torch
from timm.optim import AdamP
from torch.autograd.functional import jacobian

from decoflow_core.flow import (
    AffineCoupling,
    DecomposedSubnet,
    LoRALinear,
    MLPSubnet,
    random_permutation,
)
from decoflow_core.losses import patch_nll, tail_aware_loss
from decoflow_core.model import DeCoFlow, TaskAlignment


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: extra threads only add contention (50x slower on a busy box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_(module, scale=1.0, seed=0):
    """Give every parameter a non-trivial value (the untrained flow is the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p.shape[-1] if p.dim() >= 2 else 10
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(scale * noise / math.sqrt(fan_in))


def dcs_block(dim, *, dtype=torch.float32, seed=0):
    block = AffineCoupling(dim=dim, clamp=1.9, perm=random_permutation(dim, seed), subnet=DecomposedSubnet(
        in_dim=dim // 2, out_dim=dim - dim // 2, hidden=dim, rank=4, context_kernel=5))
    for m in block.modules():
        if isinstance(m, LoRALinear):
            m.add_task("a")
            m.active_task = "a"
    randomize_(block, seed=seed)
    return block.to(dtype)


def acl_block(dim, *, dtype=torch.float32, seed=0):
    block = AffineCoupling(dim=dim, clamp=1.9, perm=random_permutation(dim, seed), subnet=MLPSubnet(
        in_dim=dim // 2, out_dim=dim - dim // 2, hidden=dim))
    randomize_(block, seed=seed)
    return block.to(dtype)


def trained_model(dim=16, *, seed=0, **kwargs):
    """A model with one task 'a' whose base and adapters all hold non-trivial values, scaled so
    that z stays O(1) like a trained flow's (scale 1 lets |z| reach 1e5)."""
    torch.manual_seed(seed)
    model = DeCoFlow(dim=dim, rank=4, **kwargs)
    model.add_task("a")
    model.set_task("a")
    randomize_(model, scale=0.3, seed=seed)
    return model


def scale_rows(block):
    """The last layer's weight and bias rows that produce s (for DCS the whole s_out base)."""
    if isinstance(block.subnet, DecomposedSubnet):
        return block.subnet.s_out.base.weight, block.subnet.s_out.base.bias
    d2 = block.subnet.out.out_features // 2
    return block.subnet.out.weight[:d2], block.subnet.out.bias[:d2]


def saturate_(block, mode, seed=0):
    """Push |s| far past the clamp: steep ('weight' x 1e3) or flat ('bias' +-1e3, every
    clamped scale at +-clamp)."""
    weight, bias = scale_rows(block)
    with torch.no_grad():
        if mode == "weight":
            weight.mul_(1e3)
        else:
            signs = torch.randn(bias.shape, generator=torch.Generator().manual_seed(seed)).sign()
            bias.copy_(1e3 * signs)


def max_inverse_error(block, x):
    y, _ = block(x)
    return (block.inverse(y) - x).abs().max().item()


# ---- invertibility ----------------------------------------------------------------------------
@pytest.mark.parametrize("make_block", [dcs_block, acl_block])
@pytest.mark.parametrize("dim", [32, 9])
def test_block_inverse(make_block, dim):
    block = make_block(dim)
    x = torch.randn(2, 5, 4, dim)
    assert max_inverse_error(block, x) <= 1e-4


@pytest.mark.parametrize("make_block", [dcs_block, acl_block])
def test_block_inverse_with_saturated_scales(make_block):
    block = make_block(32)
    saturate_(block, "weight")
    x = torch.randn(2, 5, 4, 32)
    s, _ = block.subnet(x[..., block.perm][..., :16])
    assert s.abs().max() > 100 * block.clamp  # the clamp is doing the work
    _, logdet = block(x)
    assert logdet.abs().max() <= block.clamp * 16 + 1e-4
    assert max_inverse_error(block, x) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_model_inverse_recovers_flow_input(dtype):
    model = trained_model(32).to(dtype)
    x = torch.randn(3, 32, 6, 5, dtype=dtype)
    u = model.embed(x)
    z, _ = model(x)
    err = (model.inverse(z) - u).abs().max().item()
    print(f"\nmax |inverse(z) - embed(x)| ({dtype}): {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("mode", ["weight", "bias"])
def test_model_inverse_with_saturated_scales(mode):
    # float64: with every scale at +-clamp, 8 blocks grow some channels to |z| ~ 1e4, and the
    # shift t then cancels in (y2 - t) at float32 precision (~1e-3 back in u, for any coupling).
    model = trained_model(32).double()
    for i, block in enumerate(model._blocks()):
        saturate_(block, mode, seed=i)
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    z, logdet = model(x)
    if mode == "bias":  # every block's log-det is a sum of +-clamp
        units = logdet / model.clamp
        assert torch.allclose(units, units.round(), atol=1e-6)
    err = (model.inverse(z) - model.embed(x)).abs().max().item()
    print(f"\nsaturated ({mode}) whole-flow inverse error, float64: {err:.2e}, max|z| {z.abs().max():.1e}")
    assert err <= 1e-4


@pytest.mark.parametrize("flags", [dict(use_tsa=False), dict(standardize=False), dict(use_scm=False),
                                   dict(use_acl=False), dict(use_context=False)])
def test_ablations_build_and_invert(flags):
    model = trained_model(12, **flags)
    x = torch.randn(2, 12, 4, 4)
    z, logdet = model(x)
    assert z.shape == x.shape and logdet.shape == (2, 4, 4)
    assert (model.inverse(z) - model.embed(x)).abs().max() <= 1e-4


# ---- log-determinant against the brute-force Jacobian ------------------------------------------
def brute_force_logdet(fn, x):
    jac = jacobian(lambda flat: fn(flat.view(x.shape)).reshape(-1), x.reshape(-1))
    return jac, torch.linalg.slogdet(jac).logabsdet


@pytest.mark.parametrize("make_block", [dcs_block, acl_block])
def test_block_logdet_matches_jacobian(make_block):
    block = make_block(8, dtype=torch.float64)
    x = torch.randn(1, 3, 3, 8, dtype=torch.float64)
    jac, expected = brute_force_logdet(lambda v: block(v)[0], x)
    got = block(x)[1].sum()
    print(f"\n{make_block.__name__} log-det error vs autograd: {abs(got - expected).item():.2e}")
    assert torch.allclose(got, expected, atol=1e-8)
    patches = jac.view(9, 8, 9, 8)
    cross_patch = patches.sum(dim=(1, 3)) - torch.diag(torch.diagonal(patches.sum(dim=(1, 3))))
    if make_block is dcs_block:  # the context conv really mixes neighbouring patches
        assert block.subnet.context_gate.item() != 0 and cross_patch.abs().max() > 1e-3
    else:  # ACL acts on each patch alone
        assert cross_patch.abs().max() == 0


def test_model_logdet_matches_jacobian():
    model = trained_model(8).double()
    u = torch.randn(1, 8, 3, 3, dtype=torch.float64)
    _, expected = brute_force_logdet(lambda v: model.flow(v)[0], u)
    got = model.flow(u)[1].sum()
    print(f"\nwhole-flow log-det error vs autograd: {abs(got - expected).item():.2e}")
    assert torch.allclose(got, expected, atol=1e-8)


def test_log_prob_is_standard_normal_plus_logdet():
    model = trained_model(8)
    x = torch.randn(2, 8, 3, 3)
    z, logdet = model(x)
    normal = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(dim=1)
    assert torch.allclose(model.log_prob(x), normal + logdet, atol=1e-4)


# ---- tasks: fresh start, zero forgetting, export -----------------------------------------------
def test_fresh_task_starts_exactly_at_the_base():
    model = trained_model(16)
    model.add_task("b")
    u = torch.randn(2, 16, 4, 4)
    model.set_task("b")
    z_b, logdet_b = model.flow(u)
    model.set_task(None)
    z_base, logdet_base = model.flow(u)
    assert torch.equal(z_b, z_base) and torch.equal(logdet_b, logdet_base)
    model.set_task("a")  # sanity: a trained task does differ from the base
    assert not torch.equal(model.flow(u)[0], z_base)


def train_steps(model, x, steps=4):
    optimizer = AdamP(model.trainable_parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(steps):
        loss = tail_aware_loss(patch_nll(model.log_prob(x), dim=model.dim))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_zero_forgetting_bit_for_bit():
    torch.manual_seed(0)
    model = DeCoFlow(dim=16, rank=4)
    data = {name: torch.randn(4, 16, 4, 4) + i for i, name in enumerate("abc")}
    model.add_task("a")
    model.set_task("a")
    train_steps(model, data["a"])
    model.freeze_base()
    with torch.no_grad():
        logp_a = model.log_prob(data["a"])
    base = copy.deepcopy(model.base_state_dict())
    for name in "bc":
        model.add_task(name)
        model.set_task(name)
        base_ids = {id(p) for p in model.base_parameters()}
        assert not base_ids & {id(p) for p in model.trainable_parameters()}
        with torch.no_grad():
            before = model.log_prob(data[name])
        train_steps(model, data[name])
        with torch.no_grad():
            assert not torch.equal(model.log_prob(data[name]), before)  # the task did learn
    model.set_task("a")
    with torch.no_grad():
        assert torch.equal(model.log_prob(data["a"]), logp_a)
    after = model.base_state_dict()
    assert base.keys() == after.keys()
    assert all(torch.equal(base[k], after[k]) for k in base)


def test_task_export_and_load_into_fresh_model():
    model = trained_model(16)
    model.freeze_base()
    model.add_task("b")
    model.set_task("b")
    randomize_(torch.nn.ParameterList(model.task_parameters("b")), seed=3)
    state = model.task_state_dict("b")
    assert not any("base" in k or k.endswith(".b") for k in state)
    fresh = DeCoFlow(**model.config)
    fresh.load_base_state_dict(model.base_state_dict())
    fresh.load_task_state_dict("b", state)
    fresh.set_task("b")
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        assert torch.equal(fresh.log_prob(x), model.log_prob(x))
    assert fresh.tasks == ["b"]


def test_parameter_groups_partition_the_model():
    model = trained_model(16)
    model.add_task("b")
    groups = [model.base_parameters(), model.task_parameters("a"), model.task_parameters("b")]
    ids = [{id(p) for p in g} for g in groups]
    assert sum(map(len, ids)) == len(set().union(*ids)) == len(list(model.parameters()))
    model.set_task("b")
    assert len(model.trainable_parameters()) == len(groups[0]) + len(groups[2])
    model.freeze_base()
    assert {id(p) for p in model.trainable_parameters()} == ids[2]
    assert all(not p.requires_grad for p in groups[0]) and all(p.requires_grad for p in groups[2])


def test_task_name_errors_speak():
    model = DeCoFlow(dim=8, rank=2)
    with pytest.raises(ValueError, match="reserved by torch"):
        model.add_task("train")
    with pytest.raises(ValueError, match="contains"):
        model.add_task("bottle.v2")
    with pytest.raises(KeyError, match="add_task"):
        model.set_task("missing")


# ---- TSA --------------------------------------------------------------------------------------
def test_tsa_bounds_and_init():
    tsa = TaskAlignment(dim=4)
    tsa.add_task("a", like=torch.empty(0))
    gamma, beta = tsa.scale_shift("a")
    assert torch.allclose(gamma, torch.ones(4)) and torch.equal(beta, torch.zeros(4))
    with torch.no_grad():
        tsa.gamma_raw["a"].copy_(torch.tensor([-1e4, 1e4, 0.0, -3.0]))
        tsa.beta_raw["a"].copy_(torch.tensor([-1e4, 1e4, 0.0, 3.0]))
    gamma, beta = tsa.scale_shift("a")
    assert gamma.min() >= 0.5 and gamma.max() <= 2.0 and gamma[0] == 0.5 and gamma[1] == 2.0
    assert beta.min() >= -2.0 and beta.max() <= 2.0 and beta[0] == -2.0 and beta[1] == 2.0
    x = 5 + 3 * torch.randn(2, 3, 3, 4)
    std = tsa(x, None)  # Eq. 7 alone: zero mean, unit variance over each patch's channels
    assert torch.allclose(std.mean(-1), torch.zeros(2, 3, 3), atol=1e-5)
    assert torch.allclose(std.var(-1, unbiased=False), torch.ones(2, 3, 3), atol=1e-3)


# ---- parameter accounting ---------------------------------------------------------------------
def expected_counts(D, *, n_dcs=6, n_acl=2, r=64, hidden_ratio=1.0, N=5, k=3):
    """Hand-derived: d1 = floor(D/2), d2 = D - d1, h = hidden_ratio * D.

    base per DCS block: context conv d1*N^2 + gate 1, Linear1_s (2 d1 -> h), Linear2_s (h -> d2),
    Linear1_t (d1 -> h), Linear2_t (h -> d2), each in*out + out; plus SCM conv D*k^2.
    per task: LoRA r*(in + out) on the four linears of every DCS block, TSA 2D, SCM gate 1,
    and per ACL block Linear (d1 -> h) + Linear (h -> 2 d2), with biases.
    """
    d1, d2, h = D // 2, D - D // 2, round(hidden_ratio * D)
    dcs_base = (d1 * N * N + 1) + (2 * d1 * h + h) + (h * d2 + d2) + (d1 * h + h) + (h * d2 + d2)
    dcs_lora = r * ((2 * d1 + h) + (h + d2) + (d1 + h) + (h + d2))
    acl = (d1 * h + h) + (h * 2 * d2 + 2 * d2)
    return n_dcs * dcs_base + D * k * k, n_dcs * dcs_lora + n_acl * acl + 2 * D + 1


@pytest.mark.parametrize("dim", [768, 256])
def test_parameter_count_matches_formula(dim):
    model = DeCoFlow(dim=dim)
    model.add_task("a")
    counts = model.count_parameters()
    base, per_task = expected_counts(dim)
    assert counts["base"] == base and counts["per_task"] == per_task
    model.add_task("b")
    assert sum(p.numel() for p in model.parameters()) == base + 2 * per_task
    print(f"\nD={dim}: base {base:,}  per task {per_task:,}  ratio {counts['per_task_ratio']:.1%}")


def test_config_lora_alpha_sets_the_lora_scale_alpha_over_rank():
    from decoflow_core.config import make_config
    from decoflow_core.flow import LoRALinear
    from decoflow_core.model import build_flow
    for alpha, scale in ((None, 1.0), ("8", 0.5), ("32", 2.0)):
        sets = {"rank": "16"} if alpha is None else {"rank": "16", "lora_alpha": alpha}
        model = build_flow(make_config("smoke", sets), dim=8)
        scales = {m.scale for m in model.modules() if isinstance(m, LoRALinear)}
        assert scales == {scale}, (alpha, scales)
