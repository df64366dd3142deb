"""Run configuration: one dataclass whose defaults are the paper's settings, and named profiles.

* ``paper``    -- the paper's settings (Sec. 4.1 and the implementation details), for a GPU and MVTec-AD.
* ``official`` -- what the authors' code computes at its run.sh settings (28 x 28 grid, FrEIA couplings,
                  LoRA scale 1/64 with task biases, the official recipe): the model behind the paper's
                  numbers, proven equal to it on the official code's own outputs (tests/test_official.py).
* ``cpu``   -- the default: the offline backbone and a smaller flow, so the 15-task embedded
               benchmark trains in minutes on a 2-core machine.
* ``smoke`` -- for tests: seconds.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .scenarios import StreamError, check_order, parse_scenario


@dataclass
class Config:
    # features (Sec. 3.4)
    backbone: str = "wide_resnet50_2"  # or "<backbone>.<timm weight tag>", e.g. wide_resnet50_2.racm_in1k
    backbone_weights: str | None = None  # local weights file; None = the backbone's standard source
    image_size: int = 224
    image_resize: str = "bilinear"  # resampling of images to image_size: bilinear | lanczos
    grid: int = 14
    aggregation: str = "pool"  # patch features: pool (3x3 average, pooled to the grid) | unfold (official)
    feature_dim: int | None = 768  # channel-average the 1536 WRN channels down to D (None = keep all)
    positional_encoding: bool = True
    pe_scale: float = 1.0  # P of Eq. 6 is multiplied by this before it is added (the paper: 1)
    pe_order: str = "rows_first"  # which half of P's channels encodes the row: rows_first | columns_first
    # flow (Sec. 3.5-3.6)
    n_dcs: int = 6
    n_acl: int = 2
    rank: int = 64
    lora_alpha: float | None = None  # LoRA updates are scaled by alpha / rank; None = rank (scale 1)
    lora_init: str = "kaiming"  # A_t's init: kaiming (torch's Linear) | xavier
    lora_task_bias: bool = False  # a per-task bias in every LoRA linear, beside A_t and B_t
    hidden_ratio: float = 1.0
    dcs_zero_init: bool = True  # the last Linear of the DCS s and t nets starts at zero (identity flow)
    coupling: str = "soft_clamp"  # DCS blocks: soft_clamp (Eq. 17) | freia (AllInOneBlock: 0.1 s, 0.1 t)
    context_kernel: int = 5
    context_alpha_max: float = 1.0  # alpha = alpha_max * sigmoid(theta) in Eq. 12
    context_bias: bool = False  # the context convolution has a bias
    context_zero_init: bool = False  # the context convolution starts at zero
    use_tsa: bool = True
    standardize: bool = True
    tsa_init: str = "identity"  # gamma at first: identity (1) | official (1.25 after the first task)
    use_scm: bool = True
    scm_gate: str = "per_task"  # per_task | shared (one gate of the base, trained with the first task)
    scm_init: str = "identity"  # the SCM kernel at first: identity | box (1/9 blur)
    scm_bias: bool = False
    use_acl: bool = True
    acl_layout: str = "paper"  # paper (random split, one 2-layer MLP) | official (fixed halves, 3-layer s, t MLPs)
    acl_hidden_ratio: float | None = None  # ACL subnet width / D; None = hidden_ratio
    use_context: bool = True
    freeze_base: bool = True  # False: the base keeps training on every task (2x2 ablation, Sec. 4.3.2)
    # objective (Eq. 21)
    lambda_tail: float = 0.7
    top_k: float = 0.02
    tail_scope: str = "batch"  # TAL's top-k among the batch's patches | image (per image, official)
    nll_per_dim: bool = True  # train on the patch NLL divided by D (the official code does not divide)
    lambda_logdet: float = 0.0  # + lambda * mean(logdet^2) (the official code: 1e-4)
    # optimisation (Sec. 4.1)
    epochs: int = 60
    batch_size: int = 16
    drop_last: bool = False  # drop each epoch's last partial batch when a task has >= 32 images (official)
    lr: float = 3e-4
    task_lr: float | None = None  # decoflow: lr of every task after the first (the adapters); None = lr
    independent_lr: float | None = None  # the `independent` baseline's lr (a whole flow per task); None = lr
    weight_decay: float = 0.0
    grad_clip: float | None = None  # clip the gradient norm to this (None: no clipping)
    lr_schedule: str = "constant"  # constant | cosine (per epoch, down to lr_min_ratio * lr)
    lr_min_ratio: float = 0.01
    warmup_epochs: int = 0  # tasks after the first: lr * (e + 1) / warmup for these epochs, then the schedule
    on_nonfinite: str = "stop"  # a NaN/inf loss: stop the task with an error | skip the batch (official)
    skip_loss_above: float | None = None  # a batch whose loss exceeds this is skipped
    val_fraction: float = 0.0  # share of each task's train/good held out for validation NLL (never trained on)
    # router (Sec. 3.8)
    router_metric: str = "mahalanobis"
    router_reg: float = 1e-5
    router_shrinkage: str | None = "ledoit_wolf"
    router_accept_quantile: float = 0.99  # an image beyond this quantile of every task's own distances is "unknown"
    router_feature: str = "backbone"  # backbone (mean of the raw stages) | patch (mean of the D-dim features)
    # | patch_mean_std (mean and std of the D-dim features over the grid)
    router_covariance: str = "task"  # task: a precision per prototype | shared: one for all (Ledoit-Wolf only)
    # scoring (Sec. 3.9) and evaluation
    score_mode: str = "topk"
    score_k: int = 3
    map_upsample: str = "bilinear"  # patch scores to pixels: bilinear | bicubic
    map_sigma: float = 4.0  # Gaussian smoothing of the pixel map, in pixels at image_size
    map_padding: str = "replicate"  # the smoothing's border: replicate | reflect (scipy's)
    eval_size: int = 224  # pixel metrics are computed at eval_size x eval_size
    scenario: str = "1-1"  # B-I: B classes in the first task, I in every later one (scenarios.py)
    order: str = "given"  # the class order: given | alphabetical | texture-first | hard-first | easy-first | random:SEED
    router_prototypes: str = "task"  # one prototype per task (all its classes) | per class, mapped to its task
    task_agnostic: bool = True  # False = oracle task id (for comparison only)
    # baselines
    ewc_lambda: float = 100.0
    replay_per_task: int = 10  # images' features kept per task by `replay` (breaks the no-replay rule)
    # machinery
    device: str = "auto"
    feature_cache: str = "data/cache"
    num_threads: int = 0  # 0 = torch's default

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


PROFILES: dict[str, dict] = {
    "paper": {},
    # eval_size 128: the embedded benchmark's native resolution; upsampling its masks adds nothing.
    # Chosen on 10% of each task's train/good held out, never on test data, one after the other and on the
    # embedded stream and real_ad alike (results/selection_*.csv; docs/selection.md):
    # standardize False (TSA without Eq. 7's per-patch LayerNorm; gamma/beta kept) and pe_scale 1 (kept) by
    # the AUROC against synthetic defects; task_lr and then epochs by validation NLL (epochs bounded by the
    # 10-minute budget of the embedded run); last, the independent baseline's lr by validation NLL.
    "cpu": dict(backbone="efficientnet_lite0", feature_dim=None, hidden_ratio=0.5, rank=16, standardize=False,
                epochs=16, batch_size=16, lr=1e-3, task_lr=1e-2, independent_lr=3e-3, eval_size=128,
                router_feature="patch_mean_std", router_covariance="shared"),
    # the official code at its run.sh settings; every value is cited in docs/official.md
    "official": dict(backbone="wide_resnet50_2.racm_in1k", image_resize="lanczos", grid=28, aggregation="unfold",
                     feature_dim=768, pe_order="columns_first", lora_alpha=1.0, lora_init="xavier", lora_task_bias=True,
                     dcs_zero_init=False,
                     coupling="freia", context_alpha_max=0.2, context_bias=True, context_zero_init=True,
                     tsa_init="official", scm_gate="shared", scm_init="box", scm_bias=True, acl_layout="official",
                     acl_hidden_ratio=0.5, tail_scope="image", nll_per_dim=False, lambda_logdet=1e-4,
                     drop_last=True, weight_decay=0.01, grad_clip=0.5, lr_schedule="cosine", warmup_epochs=2,
                     on_nonfinite="skip", skip_loss_above=1e8, router_shrinkage=None, router_feature="patch", map_upsample="bicubic",
                     map_sigma=3.5, map_padding="reflect", eval_size=256),  # sigma 4 px on the 256 map = 3.5 at 224
    "smoke": dict(backbone="efficientnet_lite0", feature_dim=None, n_dcs=2, n_acl=1, rank=4,
                  hidden_ratio=0.25, epochs=1, batch_size=8, lr=1e-3, eval_size=64),
}


class ConfigError(ValueError):
    pass


# fields with a fixed set of values (None allowed where the field's type says so)
CHOICES = {
    "image_resize": ("bilinear", "lanczos"), "aggregation": ("pool", "unfold"),
    "pe_order": ("rows_first", "columns_first"), "lora_init": ("kaiming", "xavier"),
    "coupling": ("soft_clamp", "freia"), "tsa_init": ("identity", "official"),
    "scm_gate": ("per_task", "shared"), "scm_init": ("identity", "box"), "acl_layout": ("paper", "official"),
    "tail_scope": ("batch", "image"), "lr_schedule": ("constant", "cosine"), "on_nonfinite": ("stop", "skip"),
    "router_metric": ("mahalanobis", "euclidean"), "router_shrinkage": ("ledoit_wolf",),
    "router_feature": ("backbone", "patch", "patch_mean_std"), "router_covariance": ("task", "shared"), "router_prototypes": ("task", "class"), "score_mode": ("topk", "max", "mean"),
    "map_upsample": ("bilinear", "bicubic"), "map_padding": ("replicate", "reflect"),
}
# numeric fields: (lowest, highest, whether the lowest is allowed); every number must be finite
RANGES = {
    "image_size": (32, None, True), "grid": (1, None, True), "feature_dim": (4, None, True),
    "n_dcs": (1, None, True), "n_acl": (0, None, True), "rank": (1, None, True), "lora_alpha": (0, None, False),
    "hidden_ratio": (0, None, False), "acl_hidden_ratio": (0, None, False), "context_kernel": (1, None, True),
    "context_alpha_max": (0, None, True), "pe_scale": (0, None, True), "lambda_tail": (0, 1, True),
    "top_k": (0, 1, False), "lambda_logdet": (0, None, True), "epochs": (1, None, True),
    "batch_size": (1, None, True), "lr": (0, None, False), "task_lr": (0, None, False),
    "independent_lr": (0, None, False), "weight_decay": (0, None, True), "grad_clip": (0, None, False),
    "lr_min_ratio": (0, 1, True), "warmup_epochs": (0, None, True), "skip_loss_above": (0, None, False),
    "val_fraction": (0, 1, True), "router_reg": (0, None, True), "score_k": (1, None, True),
    "router_accept_quantile": (0, 1, False),
    "map_sigma": (0, None, True), "eval_size": (8, None, True), "ewc_lambda": (0, None, True),
    "replay_per_task": (0, None, True), "num_threads": (0, None, True),
}


def _range_text(low, high, low_ok) -> str:
    if high is None:
        return f"{'>=' if low_ok else '>'} {low:g}"
    return f"in {'[' if low_ok else '('}{low:g}, {high:g}]"


def validate(config: Config) -> Config:
    """Every field in its allowed values, or ConfigError naming the ``--set`` key and what is allowed:
    the one check, run before any feature is extracted."""
    for key, allowed in CHOICES.items():
        value = getattr(config, key)
        if value not in allowed and not (value is None and "None" in str(Config.__dataclass_fields__[key].type)):
            extra = ", none" if "None" in str(Config.__dataclass_fields__[key].type) else ""
            raise ConfigError(f"--set {key}={value}: expected one of {', '.join(allowed)}{extra}")
    for key, (low, high, low_ok) in RANGES.items():
        value = getattr(config, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < low or (value == low and not low_ok) or (high is not None and value > high) \
                or (key == "val_fraction" and value >= 1):
            allowed = "in [0, 1)" if key == "val_fraction" else _range_text(low, high, low_ok)
            raise ConfigError(f"--set {key}={value}: expected a finite number {allowed}")
    try:
        parse_scenario(config.scenario)
        check_order(config.order)
    except StreamError as err:
        raise ConfigError(str(err)) from None  # the flags --scenario and --order set these fields
    if config.router_covariance == "shared" and (config.router_metric, config.router_shrinkage) != ("mahalanobis", "ledoit_wolf"):
        raise ConfigError(f"--set router_covariance=shared: needs router_metric=mahalanobis and router_shrinkage="
                          f"ledoit_wolf, got {config.router_metric} and {config.router_shrinkage}")
    if not (config.device in ("auto", "cpu", "mps") or config.device == "cuda" or
            (config.device.startswith("cuda:") and config.device[5:].isdigit())):
        raise ConfigError(f"--set device={config.device}: expected auto, cpu, cuda, cuda:N or mps")
    return config


def make_config(profile: str = "cpu", overrides: dict[str, str] | None = None) -> Config:
    """The profile's config with ``key=value`` overrides (strings, parsed by the field's type), validated."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    config = Config(**PROFILES[profile])
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for key, raw in (overrides or {}).items():
        if key not in fields:
            raise ConfigError(f"unknown --set key {key!r}; known keys: {', '.join(sorted(fields))}")
        setattr(config, key, parse_value(raw, str(fields[key].type), key))
    return validate(config)


_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def parse_value(raw, annotation: str, key: str):
    """``raw`` parsed as the field's declared type, e.g. ``"float | None"``: "none"/"null" -> None."""
    if not isinstance(raw, str):
        return raw
    kinds = [k.strip() for k in annotation.split("|")]
    if raw.lower() in ("none", "null"):
        if "None" not in kinds:
            raise ConfigError(f"--set {key}={raw}: {key} cannot be None")
        return None
    kind = _TYPES[kinds[0]]
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        return kind(raw)
    except ValueError:
        raise ConfigError(f"--set {key}={raw}: expected a {kinds[0]}") from None


def as_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


# fields only some methods read: a saved run of any other method does not depend on them
METHOD_ONLY = {"independent_lr": ("independent",)}


def changed_fields(saved: dict, config: Config, method: str | None = None) -> list[str]:
    """Fields where a saved config (``config.json`` -> ``config``) differs from ``config``; a field
    the saved one lacks (written before the field existed) counts as its default. Given the run's
    ``method``, fields that method does not read (``METHOD_ONLY``) are left out."""
    default = as_dict(Config())
    return [key for key, value in as_dict(config).items() if saved.get(key, default[key]) != value
            and (method is None or method in METHOD_ONLY.get(key, (method,)))]
