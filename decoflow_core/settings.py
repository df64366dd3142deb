"""Every setting of the method: what the paper's text says, what the official code computes, and the
value of each Config field in the ``paper``, ``official`` and ``cpu`` profiles.

The official column cites crimama/DeCoFlow at run.sh settings (file:line in that repository; FrEIA is
FrEIA 0.2's ``all_in_one_block.py``). The profile columns are read from ``config.PROFILES``, so the
table cannot drift from the code.
"""
from __future__ import annotations

import pandas as pd

from .config import Config, make_config

PROFILE_COLUMNS = ("paper", "official", "cpu")

# (setting, Config fields, the paper's text, the official code, where in the official code)
SETTINGS = [
    ("Backbone", ("backbone",), "WideResNet-50-2, layers 2+3",
     "timm wide_resnet50_2, layer2+layer3; timm 1.0 resolves pretrained=True to racm_in1k", "cnn_extractor.py:164"),
    ("Image size and resampling", ("image_size", "image_resize"), "224 px",
     "Resize(224, LANCZOS) + CenterCrop(224)", "mvtec.py:22-23, 95-101"),
    ("Patch grid", ("grid",), "14x14",
     "28x28, the layer-2 grid", "cnn_extractor.py:214-242"),
    ("Patch features", ("aggregation", "feature_dim"), "layers 2+3 (no aggregation stated)",
     "3x3 unfold, layer 3 upsampled to 28x28, each stage pooled to 768, stages averaged", "preprocessing.py:19-40"),
    ("Positional encoding", ("positional_encoding", "pe_order", "pe_scale"), "2D sinusoidal, added (Eq. 6)",
     "added; first half of the channels encodes the column", "position_embedding.py:24-70"),
    ("Blocks", ("n_dcs", "n_acl"), "6 DCS + 2 ACL (Sec. 4.1)",
     "6 AllInOneBlocks + 2 ACL couplings", "run.sh:22-41"),
    ("DCS coupling", ("coupling",), "s~ = a tanh(s/a) (Eq. 17), a not stated",
     "FrEIA: 1.9 tanh(0.1 s), shift 0.1 t, fixed global affine, permutation after the block", "FrEIA :206-266"),
    ("Subnet width", ("hidden_ratio",), "not stated",
     "2 d1 = D", "dcl.py:1215"),
    ("DCS init", ("dcs_zero_init",), "not stated",
     "torch's default for every base linear", "dcl.py:54"),
    ("LoRA rank", ("rank",), "64",
     "64", "run.sh"),
    ("LoRA scale alpha/r", ("lora_alpha",), "alpha/r, alpha not stated",
     "alpha 1: 1/64", "run_decoflow.py:135-136"),
    ("LoRA A init", ("lora_init",), "not stated",
     "Xavier-uniform, B zero", "dcl.py:86-90"),
    ("Per-task LoRA bias", ("lora_task_bias",), "no",
     "yes, zero at first, task 0 too", "dcl.py:96-98, 127-160"),
    ("Context kernel", ("context_kernel",), "5",
     "5", "run.sh"),
    ("Context scale", ("context_alpha_max",), "alpha = sigmoid-gated, maximum not stated (Eq. 12)",
     "0.2 sigmoid(p), 0.1 at first", "dcl.py:1234-1242, 1397-1398"),
    ("Context conv", ("context_bias", "context_zero_init"), "depthwise conv",
     "depthwise with bias, both zero at first", "dcl.py:1227-1242"),
    ("TSA", ("use_tsa", "standardize"), "LayerNorm, gamma in [0.5, 2], beta in [-2, 2] (Eq. 7-10)",
     "the same", "adapters.py:437-526"),
    ("TSA init", ("tsa_init",), "not stated",
     "gamma 0.998 for task 0, 1.25 after it", "adapters.py:481-494"),
    ("Spatial mixer gate", ("scm_gate",), "learnable gate (Eq. 11)",
     "one shared gate, trained in task 0 only", "adapters.py:768-773; decoflow_nf.py:1624-1645"),
    ("Spatial mixer kernel", ("scm_init", "scm_bias"), "depthwise conv, kernel not stated",
     "3x3, 1/9 box at first, with bias", "adapters.py:684-708"),
    ("ACL", ("acl_layout", "acl_hidden_ratio"), "standard couplings, own weights per task (Sec. 3.6.2)",
     "fixed halves, separate 3-layer s and t MLPs of width D/2, soft clamp 1.9", "dcl.py:839-1137"),
    ("NLL scale", ("nll_per_dim",), "per patch (Eq. 21)",
     "per patch, not divided by D", "continual_trainer.py:446-452"),
    ("Tail-Aware Loss", ("lambda_tail", "top_k", "tail_scope"), "lambda 0.7 on the top 2% (Eq. 21)",
     "0.7 on the top int(0.02 HW) of each image", "continual_trainer.py:426-491"),
    ("Log-det regulariser", ("lambda_logdet",), "no",
     "+ 1e-4 mean(logdet^2)", "continual_trainer.py:1227-1234"),
    ("Optimiser", ("lr", "weight_decay"), "AdamP, lr 3e-4",
     "AdamP lr 3e-4, weight decay 0.01", "continual_trainer.py:42-76"),
    ("Later tasks' lr", ("task_lr",), "the same",
     "the same", "continual_trainer.py:1369-1388"),
    ("Epochs and batch", ("epochs", "batch_size", "drop_last"), "60 epochs, batch 16",
     "60, 16, last partial batch dropped from 32 images", "run_decoflow.py:537-548"),
    ("Gradient clipping", ("grad_clip",), "no",
     "norm 0.5", "continual_trainer.py:1265, 1476"),
    ("lr schedule", ("lr_schedule", "lr_min_ratio", "warmup_epochs"), "not stated",
     "cosine to 0.01 lr per epoch; later tasks 0.5 lr, lr, then the cosine", "continual_trainer.py:1166-1508"),
    ("Loss guard", ("on_nonfinite", "skip_loss_above"), "not stated",
     "a batch with a NaN loss or a loss > 1e8 is skipped", "continual_trainer.py:1260-1261"),
    ("Baseline `independent`'s lr", ("independent_lr",), "not stated",
     "no such baseline", ""),
    ("Router", ("router_metric", "router_reg", "router_shrinkage", "router_covariance"), "Mahalanobis, Sigma + 1e-5 I (Sec. 3.8)",
     "Mahalanobis, sample covariance + 1e-5 I", "routing.py:43-110"),
    ("Router feature", ("router_feature",), "global average pooled backbone output (Sec. 3.8)",
     "grid mean of the 768-d features without PE", "cnn_extractor.py:285-296"),
    ("Image score", ("score_mode", "score_k"), "mean of the top-3 patch scores (Sec. 3.9)",
     "mean of the top-3 of the unsmoothed map", "continual_trainer.py:1941-1945"),
    ("Pixel map", ("map_upsample", "map_sigma", "map_padding", "eval_size"), "not stated",
     "bicubic to 256, then Gaussian sigma 4 with reflect borders", "evaluator.py:77-100"),
]


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def profile_values(config: Config, fields: tuple[str, ...]) -> str:
    return ", ".join(_value(getattr(config, field)) for field in fields)


def settings_table(run_config: dict | None = None, cite: bool = True) -> pd.DataFrame:
    """One row per setting: the paper's text, the official code (with file:line when ``cite``), the
    Config fields and the value of each in the paper, official and cpu profiles (in the order of the
    fields); with a run's saved config (``config.json`` -> ``config``), a last column "this run"."""
    configs = {f"`{name}`": make_config(name) for name in PROFILE_COLUMNS}
    if run_config is not None:  # a field the saved config lacks (older run) counts as its default
        configs["this run"] = Config(**{k: v for k, v in run_config.items() if k in Config.__dataclass_fields__})
    rows = []
    for setting, fields, paper, official, where in SETTINGS:
        rows.append({"setting": setting, "paper's text": paper,
                     "official code": f"{official} ({where})" if cite and where else official,
                     "Config field": ", ".join(fields),
                     **{name: profile_values(config, fields) for name, config in configs.items()}})
    return pd.DataFrame(rows)


def settings_markdown(cite: bool = True, fields: bool = True) -> str:
    """The table as GitHub markdown: docs/official.md carries it whole, the README without the
    citations and the Config field names."""
    table = settings_table(cite=cite)
    if not fields:
        table = table.drop(columns="Config field")
    header = "| " + " | ".join(table.columns) + " |"
    lines = [header, "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v).replace("|", "/") for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"
