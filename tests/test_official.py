"""The `official` profile computes the official DeCoFlow: equality with the official code's own outputs.

tests/fixtures/official_decoflow_fixture.pt was produced by running the authors' code (crimama/DeCoFlow
at run.sh settings, D=32, LoRA rank 4, 28x28 grid, two tasks, weights perturbed away from their init)
on given features: its state dict in the official key names, the inputs, and every intermediate and
final output, gradients included. After `load_official_state_dict`, the kit's own code must give the
same numbers.

Tolerance: float32 throughout; every compared tensor must satisfy
max |kit - official| <= 1e-5 * max |official| (measured: <= 6e-7 for activations, losses and maps,
<= 2e-6 for gradients).
"""
import math
from pathlib import Path

import pytest
import torch

from decoflow_core import load_official_state_dict
from decoflow_core.config import make_config
from decoflow_core.losses import (
    logdet_penalty,
    patch_nll,
    tail_aware_loss,
    training_loss,
)
from decoflow_core.model import build_flow, gaussian_log_prob
from decoflow_core.official import OfficialImportError, kit_key
from decoflow_core.router import PrototypeRouter
from decoflow_core.scoring import image_score, pixel_maps
from decoflow_core.train import epoch_lr, fit

FIXTURE = Path(__file__).parent / "fixtures" / "official_decoflow_fixture.pt"
TOLERANCE = 1e-5
GRADS = {"0": "task0_total_loss_wrt_task0_optimised_params (before task1 added)",
         "1": "task1_total_loss_wrt_task1_fast_params"}
# fixture variant -> (state dict, outputs): the perturbed FrEIA global affine, and the identity it keeps in training
VARIANTS = {"perturbed": ("state_dict", "outputs"), "identity": ("state_dict_global_affine_init",
                                                                   "outputs_global_affine_init")}


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def config():
    return make_config("official")


def assert_matches(actual, expected, what):
    actual, expected = actual.detach().double(), expected.detach().double().reshape(actual.shape)
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= TOLERANCE * max(scale, 1e-12), f"{what}: max |kit - official| = {error:.3g} (scale {scale:.3g})"


def flow_input(fixture):
    inputs = fixture["inputs"]
    return (inputs["features"] + inputs["pos_embed"]).permute(0, 3, 1, 2)  # (B, D, H, W)


def kit_outputs(model, x, task, config):
    """Every value the fixture records, computed by the kit (channels-last where the fixture is)."""
    model.set_task(task)
    with torch.no_grad():
        u = model.embed(x)
        record = {}
        z, logdet = model.flow(u, record=record)
        log_pz = gaussian_log_prob(z)
        nll = patch_nll(log_pz + logdet)
        out = {"x_with_pos": x.permute(0, 2, 3, 1), "tsa.out": model.tsa(x.permute(0, 2, 3, 1), task), "spatial_mixer.out": u.permute(0, 2, 3, 1),
               "flow_input_flat": u.permute(0, 2, 3, 1).reshape(-1, model.dim),
               "z_base": record["z_base"], "logdet_base_patch": record["logdet_base"],
               "logdet_acl_patch": logdet - record["logdet_base"], "z": z.permute(0, 2, 3, 1),
               "logdet_patch": logdet, "log_pz_patch": log_pz, "nll_patch": nll, "anomaly_map": nll,
               "tail_aware_loss": tail_aware_loss(nll, lambda_tail=config.lambda_tail, top_k=config.top_k,
                                                  per_image=True),
               "logdet_reg": logdet_penalty(logdet), "total_training_loss": training_loss(model, x, config),
               "image_score": image_score(nll, mode=config.score_mode, k=config.score_k),
               "anomaly_map_256_smoothed": pixel_maps(nll, config),
               "context_alpha": torch.stack([b.subnet.alpha_max * torch.sigmoid(b.subnet.context_gate)
                                             for b in model.dcs]),
               "global_affine_scale": torch.stack([b.affine_scale for b in model.dcs])}
        out.update({f"flow.block{k}.logdet": ld.reshape(-1) for k, ld in enumerate(record["block_logdets"][:6])})
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("task", ["0", "1"])
def test_forward_pass_losses_and_maps_equal_the_official_code(fixture, config, variant, task):
    state_key, outputs_key = VARIANTS[variant]
    expected = fixture[outputs_key][f"task{task}"]
    model = load_official_state_dict(fixture[state_key])
    assert model.tasks == ["0", "1"]
    ours = kit_outputs(model, flow_input(fixture), task, config)
    compared = [name for name in expected if name in ours]
    assert len(compared) >= 13, f"fixture names not compared: {sorted(set(expected) - set(ours))}"
    assert set(expected) - set(ours) <= {"tal_k"}
    for name in compared:
        assert_matches(ours[name], expected[name], f"{variant} task {task}: {name}")
    if "tal_k" in expected:
        assert max(1, int(config.top_k * 28 * 28)) == int(expected["tal_k"])


@pytest.mark.parametrize("task", ["0", "1"])
def test_gradients_of_the_total_loss_equal_the_official_code(fixture, config, task):
    """d(total loss)/d(parameter) for what the official code optimises: task 0 trains the base, the
    mixer, the context convolutions and task 0's adapters; task 1 its LoRA, biases, TSA and ACL."""
    model = load_official_state_dict(fixture["state_dict"])
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    expected = fixture["grads"][GRADS[task]]
    names = [kit_key(name) for name in expected]
    model.set_task(task)
    grads = torch.autograd.grad(training_loss(model, flow_input(fixture), config), [params[n] for n in names])
    for name, grad, reference in zip(expected, grads, expected.values()):
        assert_matches(grad, reference, f"grad of {name}")
    if task == "1":  # a later task's gradients are exactly its own parameters
        assert {id(params[n]) for n in names} == {id(p) for p in model.task_parameters("1")}


def test_task_0_is_unchanged_after_task_1_is_added(fixture, config):
    only_task0 = {k: v for k, v in fixture["state_dict"].items()
                  if not k.endswith(".1") and not k.startswith(("input_adapters.1.", "acl_adapters.1."))}
    model = load_official_state_dict(only_task0)
    assert model.tasks == ["0"]
    x = flow_input(fixture)
    before = kit_outputs(model, x, "0", config)
    model.freeze_base()
    model.add_task("1")
    after = kit_outputs(model, x, "0", config)
    for name, value in fixture["outputs"]["task0_after_adding_task1"].items():
        assert torch.equal(after[name], before[name]), name
        assert_matches(after[name], value, f"task 0 after task 1: {name}")


def test_positional_encoding_equals_the_official_code(fixture, config):
    from decoflow_core.backbone import positional_encoding_2d
    ours = positional_encoding_2d(32, 28, 28, config.pe_order).permute(1, 2, 0)  # (H, W, D) as the fixture
    assert_matches(ours, fixture["inputs"]["pos_embed"], "positional encoding")


def test_routing_equals_the_official_code(fixture, config):
    """Grid-mean features without PE, sample covariance + 1e-5 I, no shrinkage, argmin distance."""
    inputs, expected = fixture["inputs"], fixture["outputs"]["routing"]
    router = PrototypeRouter(metric=config.router_metric, reg=config.router_reg, shrinkage=config.router_shrinkage)
    for task in ("0", "1"):
        train = inputs[f"proto_train_image_features_task{task}"]
        router.add_task(task, train)
        assert_matches(router.means[-1], expected["proto_mean"][int(task)], "prototype mean")
        assert_matches(torch.linalg.inv(router.precisions[-1].double()), expected["proto_cov"][int(task)],
                       "prototype covariance + 1e-5 I")
    features = inputs["features"].mean(dim=(1, 2))  # (B, D): the grid mean, before PE
    assert_matches(features, expected["image_level_features"], "image-level features")
    assert_matches(router.distances(features), expected["mahalanobis"], "Mahalanobis distances")
    routed = router.route(features)
    assert routed == [str(int(t)) for t in expected["predicted_tasks"]]
    model = load_official_state_dict(fixture["state_dict"])
    x = flow_input(fixture)
    nll = torch.stack([kit_outputs(model, x[i:i + 1], task, config)["nll_patch"][0] for i, task in enumerate(routed)])
    assert_matches(nll, expected["anomaly_map"], "routed anomaly map")
    assert_matches(image_score(nll, k=config.score_k), expected["image_score"], "routed image score")


def test_an_unknown_key_is_refused_by_name(fixture):
    state = dict(fixture["state_dict"])
    state["flow.module_list.0.subnet.extra_gate"] = torch.zeros(1)
    with pytest.raises(OfficialImportError, match="flow.module_list.0.subnet.extra_gate"):
        load_official_state_dict(state)
    state = {k: v for k, v in fixture["state_dict"].items() if k != "spatial_mixer.depthwise_conv.bias"}
    state["spatial_mixer.depthwise_conv.weight"] = torch.zeros(3, 1, 3, 3)
    with pytest.raises(OfficialImportError, match="spatial_mixer.depthwise_conv.weight"):
        load_official_state_dict(state)


def test_official_init_matches_the_official_code():
    """Initial values the official code documents: gamma 0.998 then 1.25, context alpha 0.1 with a
    zero conv, the mixer a 1/9 box with gate 0.5, LoRA B and task biases zero, ACL the identity."""
    model = build_flow(make_config("official"), 32)
    model.add_task("0")
    model.add_task("1")
    gammas = [model.tsa.scale_shift(t)[0] for t in ("0", "1")]
    assert torch.allclose(gammas[0], torch.full((32,), 0.5 + 1.5 * torch.sigmoid(torch.tensor(-0.7)).item()))
    assert torch.allclose(gammas[1], torch.full((32,), 1.25))
    block = model.dcs[0]
    assert (block.subnet.alpha_max * torch.sigmoid(block.subnet.context_gate)).item() == pytest.approx(0.1)
    assert block.subnet.context.weight.abs().sum() == 0 and block.subnet.context.bias.abs().sum() == 0
    assert torch.allclose(model.scm.conv.weight, torch.full_like(model.scm.conv.weight, 1 / 9))
    assert model.scm.shared_gate.item() == 0.5 and model.scm.conv.bias.abs().sum() == 0
    assert block.subnet.s_in.lora_B["1"].abs().sum() == 0 and block.subnet.s_in.task_bias["1"].abs().sum() == 0
    bound = math.sqrt(6 / (64 + 32))  # Xavier-uniform on A (rank 64 x 32 inputs)
    assert 0.9 * bound < block.subnet.s_in.lora_A["1"].abs().max().item() <= bound
    x = torch.randn(2, 32, 4, 4)
    model.set_task("1")
    record = {}
    z, _ = model.flow(x, record=record)
    assert torch.equal(z.permute(0, 2, 3, 1), record["z_base"])  # a new task's ACL is the identity
    assert block.subnet.s_in.scale == pytest.approx(1 / 64)


# ---- the official training recipe: lr schedule and clipping, hand-computed ----------------------
def cosine(lr, e, epochs, low=0.01):
    return low * lr + (lr - low * lr) * (1 + math.cos(math.pi * e / epochs)) / 2


def test_lr_schedule_of_the_first_and_of_a_later_task():
    config = make_config("official").replace(epochs=6, lr=1e-3)
    first = [epoch_lr(config, e, first=True) for e in range(6)]
    later = [epoch_lr(config, e, first=False) for e in range(6)]
    # first task: 1e-5 + 9.9e-4 (1 + cos(pi e / 6)) / 2, i.e. cosine from lr towards 0.01 lr
    root3 = math.sqrt(3)
    by_hand = [1e-3, 1e-5 + 9.9e-4 * (2 + root3) / 4, 7.525e-4, 5.05e-4, 2.575e-4, 1e-5 + 9.9e-4 * (2 - root3) / 4]
    assert first == pytest.approx(by_hand, rel=1e-12)
    # later task: 0.5 lr, lr (warm-up), then the cosine from its start: epoch e at cos(e - 2)
    assert later == pytest.approx([5e-4, 1e-3] + by_hand[:4], rel=1e-12)
    constant = make_config("cpu")
    assert {epoch_lr(constant, e, first=f) for e in range(4) for f in (True, False)} == {constant.lr}


def test_lr_schedule_matches_torch_cosine_annealing_as_the_official_code_steps_it():
    config = make_config("official").replace(epochs=60)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=60, eta_min=0.01 * config.lr)
    for epoch in range(60):
        assert epoch_lr(config, epoch, first=True) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
        optimizer.step()
        scheduler.step()


def test_fit_uses_the_schedule_and_clips_the_gradient_norm(monkeypatch):
    """One parameter, loss = 10 * w: gradient 10, clipped to 0.5; the lr of each epoch is the schedule's."""
    from decoflow_core import train
    seen = []

    class Recorder(torch.optim.SGD):
        def __init__(self, params, lr, weight_decay):
            super().__init__(params, lr=lr)

        def step(self):
            seen.append((self.param_groups[0]["lr"], self.param_groups[0]["params"][0].grad.item()))
            super().step()

    monkeypatch.setattr(train, "AdamP", Recorder)
    config = make_config("official").replace(epochs=4, lr=1.0, batch_size=2, grad_clip=0.5)
    weight = torch.nn.Parameter(torch.zeros(1))
    model = torch.nn.Linear(1, 1)
    fit(model, [weight], torch.zeros(4, 1, 1, 1), config, seed=0, first=False, loss_fn=lambda m, x: 10 * weight.sum())
    lrs = [lr for lr, _ in seen]
    assert lrs == pytest.approx([0.5] * 2 + [1.0] * 2 + [1.0] * 2 + [cosine(1.0, 1, 4)] * 2)
    assert [g for _, g in seen] == pytest.approx([0.5] * 8)  # |grad| 10 clipped to norm 0.5
    seen.clear()
    fit(model, [weight], torch.zeros(4, 1, 1, 1), config.replace(grad_clip=None), seed=0,
        loss_fn=lambda m, x: 10 * weight.sum())
    assert [g for _, g in seen] == pytest.approx([10.0] * 8)


def test_drop_last_from_32_images(monkeypatch):
    sizes = []
    config = make_config("official").replace(epochs=1, batch_size=16)
    weight = torch.nn.Parameter(torch.zeros(1))
    loss = lambda m, x: (sizes.append(len(x)), weight.sum())[1]
    fit(torch.nn.Linear(1, 1), [weight], torch.zeros(40, 1, 1, 1), config, seed=0, loss_fn=loss)
    assert sizes == [16, 16]  # 40 images: the last 8 are dropped
    sizes.clear()
    fit(torch.nn.Linear(1, 1), [weight], torch.zeros(20, 1, 1, 1), config, seed=0, loss_fn=loss)
    assert sizes == [16, 4]  # fewer than 32: every image is used


def test_params_command_gives_the_official_counts(capsys):
    """`params --profile official --dim 768` against the official code's own counts (D=768, r=64)."""
    import json

    from decoflow_core.cli import main
    official = json.loads((Path(__file__).parent / "fixtures" / "official_param_counts.json").read_text())
    assert main(["params", "--profile", "official", "--dim", "768"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert ours["per_task"] == official["per_task_total"]["1"] == 3_706_368
    assert ours["base"] == official["shared_total_excl_perm_and_global_affine"] == 8_928_775
    assert ours["per_task_by_module"] == {"lora_A": 1_032_192, "lora_B": 884_736, "task_bias": 13_824,
                                          "tsa": 1_536, "acl": 1_774_080} == official["per_task"]["1"]
    shared = official["shared"]
    assert ours["base_by_module"] == {"dcs_base_linear": shared["dcl_base_linear"],
                                      "context_conv": shared["scale_context_conv (depthwise kxk on x1)"],
                                      "context_alpha": shared["scale_context_alpha_param"],
                                      "spatial_mixer": shared["spatial_context_mixer"]}


def test_the_official_profile_runs_the_protocol_end_to_end(tiny_tree, smoke_cache, tmp_path, capsys):
    """The official recipe through `run` (cosine + warm-up, clipping, drop_last, the log-det penalty, TAL
    per image, unfold features, FrEIA couplings), at a size that takes seconds: the offline backbone at
    64 px (the unfold grid is then 8), two blocks, D = 32."""
    from decoflow_core.cli import main
    from decoflow_core.files import read_json
    sets = {"backbone": "efficientnet_lite0", "image_size": 64, "grid": 8, "feature_dim": 32, "n_dcs": 2,
            "rank": 4, "epochs": 2, "batch_size": 4, "eval_size": 64, "device": "cpu", "num_threads": 1,
            "feature_cache": str(smoke_cache)}
    argv = ["run", "--profile", "official", "--data", str(tiny_tree), "--tasks", "checker,gradient",
            "--out", str(tmp_path / "run")]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    assert main(argv) == 0
    metrics = read_json(tmp_path / "run" / "metrics.json")
    assert metrics["forgetting"]["image_auroc"] == 0.0 and metrics["routing_accuracy"] is not None
    assert all(h["nonfinite"] == 0 and len(h["loss"]) == 2 for h in metrics["history"].values())
    config = read_json(tmp_path / "run" / "config.json")["config"]
    assert config["coupling"] == "freia" and config["aggregation"] == "unfold" and config["grad_clip"] == 0.5
