"""Checkpoints of the official DeCoFlow code (crimama/DeCoFlow) loaded into the kit's ``DeCoFlow``.

The official model is the kit's model with the options of the ``official`` profile (README "Paper,
official code and profiles"); only the names and a few shapes differ. ``load_official_state_dict``
maps every key of an official state dict onto the kit's model and refuses a key it cannot map.

Two official tensors are stored differently here: FrEIA's ``w_perm`` (a D x D permutation matrix,
``out = v @ w_perm.T``) becomes the index vector ``perm``, and FrEIA's ``global_scale`` becomes the
scale it produces, ``0.1 * softplus(global_scale, beta=0.5)``, a fixed buffer like the offset.
The TSA buffers ``reference_mean`` / ``reference_std`` are not read by the official forward pass and
are dropped.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from .model import DeCoFlow


class OfficialImportError(ValueError):
    """An official state dict the kit cannot map; the message names the key."""


_LAYERS = {"s_layer1": "s_in", "s_layer2": "s_out", "t_layer1": "t_in", "t_layer2": "t_out"}
_LORA = {"lora_A": "lora_A", "lora_B": "lora_B", "task_biases": "task_bias"}
# official key pattern -> kit key template; groups are reused in the template
_RULES = [
    (r"flow\.module_list\.(\d+)\.global_scale", "dcs.{0}.affine_scale"),
    (r"flow\.module_list\.(\d+)\.global_offset", "dcs.{0}.affine_offset"),
    (r"flow\.module_list\.(\d+)\.w_perm", "dcs.{0}.perm"),
    (r"flow\.module_list\.(\d+)\.w_perm_inv", "dcs.{0}.inv_perm"),
    (r"flow\.module_list\.(\d+)\.subnet\.context_scale_param", "dcs.{0}.subnet.context_gate"),
    (r"flow\.module_list\.(\d+)\.subnet\.context_conv\.(weight|bias)", "dcs.{0}.subnet.context.{1}"),
    (r"flow\.module_list\.(\d+)\.subnet\.([st]_layer[12])\.base_linear\.(weight|bias)", "dcs.{0}.subnet.{1}.base.{2}"),
    (r"flow\.module_list\.(\d+)\.subnet\.([st]_layer[12])\.(lora_A|lora_B|task_biases)\.(\w+)",
     "dcs.{0}.subnet.{1}.{2}.{3}"),
    (r"input_adapters\.(\w+)\.(gamma_raw|beta_raw)", "tsa.{1}.{0}"),
    (r"input_adapters\.(\w+)\.(reference_mean|reference_std)", None),  # unused by the forward pass
    (r"acl_adapters\.(\w+)\.coupling_blocks\.(\d+)\.([st]_net)\.layers\.(\d+)\.(weight|bias)",
     "acl.{0}.{1}.subnet.{2}.{3}.{4}"),
    (r"spatial_mixer\.residual_gate", "scm.shared_gate"),
    (r"spatial_mixer\.depthwise_conv\.(weight|bias)", "scm.conv.{0}"),
]


def kit_key(official_key: str) -> str | None:
    """The kit's state-dict key of an official key (None: dropped on purpose); OfficialImportError
    for a key the kit has no counterpart for."""
    for pattern, template in _RULES:
        match = re.fullmatch(pattern, official_key)
        if match:
            if template is None:
                return None
            groups = [_LAYERS.get(g, _LORA.get(g, g)) for g in match.groups()]
            return template.format(*groups)
    raise OfficialImportError(f"official state dict key {official_key!r} has no counterpart in the kit's "
                              f"DeCoFlow (expected the run.sh architecture: FrEIA AllInOneBlocks with "
                              f"DCL context subnets, TSA input adapters, ACL adapters, spatial mixer)")


def _count(keys, pattern) -> int:
    return len({m.group(1) for k in keys if (m := re.fullmatch(pattern, k))})


def _tasks(keys) -> list[str]:
    names = {m.group(1) for k in keys if (m := re.fullmatch(r".*\.lora_A\.(\w+)", k))}
    return sorted(names, key=lambda t: (not t.isdigit(), int(t) if t.isdigit() else 0, t))


def _perm_from_matrix(matrix: torch.Tensor, key: str) -> torch.Tensor:
    """w_perm[i, perm[i]] = 1 (FrEIA: out = F.linear(v, w_perm) = v[:, perm])."""
    dim = matrix.shape[0]
    perm = matrix.argmax(dim=1)
    if matrix.shape != (dim, dim) or not torch.equal(matrix, torch.eye(dim, dtype=matrix.dtype)[perm]):
        raise OfficialImportError(f"{key}: expected a {dim} x {dim} permutation matrix")
    return perm


def official_architecture(state_dict: dict, *, lora_alpha: float = 1.0, clamp: float = 1.9,
                          alpha_max: float = 0.2) -> dict:
    """The ``DeCoFlow`` keyword arguments of an official state dict (sizes read from its shapes;
    ``lora_alpha``, ``clamp`` and the context's ``alpha_max`` are not stored in it: run.sh's values)."""
    keys = list(state_dict)
    for required in ("flow.module_list.0.w_perm", "flow.module_list.0.subnet.s_layer1.base_linear.weight"):
        if required not in state_dict:
            raise OfficialImportError(f"not an official DeCoFlow state dict: {required!r} is missing")
    dim = state_dict["flow.module_list.0.w_perm"].shape[0]
    tasks = _tasks(keys)
    if not tasks:
        raise OfficialImportError("the official state dict holds no task (no '...lora_A.<task>' key)")
    first = tasks[0]
    n_acl = _count(keys, rf"acl_adapters\.{first}\.coupling_blocks\.(\d+)\..*")
    context = state_dict.get("flow.module_list.0.subnet.context_conv.weight")
    mixer = state_dict.get("spatial_mixer.depthwise_conv.weight")
    arch = dict(dim=dim, n_dcs=_count(keys, r"flow\.module_list\.(\d+)\..*"), n_acl=max(n_acl, 1),
                use_acl=n_acl > 0, rank=state_dict[f"flow.module_list.0.subnet.s_layer1.lora_A.{first}"].shape[0],
                lora_alpha=lora_alpha, clamp=clamp, alpha_max=alpha_max,
                hidden_ratio=state_dict["flow.module_list.0.subnet.s_layer1.base_linear.weight"].shape[0] / dim,
                use_context=context is not None, context_kernel=context.shape[-1] if context is not None else 5,
                context_bias="flow.module_list.0.subnet.context_conv.bias" in state_dict, context_zero_init=True,
                use_tsa=f"input_adapters.{first}.gamma_raw" in state_dict, standardize=True, tsa_init="official",
                use_scm=mixer is not None, scm_kernel=mixer.shape[-1] if mixer is not None else 3,
                scm_gate="shared", scm_init="box", scm_bias="spatial_mixer.depthwise_conv.bias" in state_dict,
                coupling="freia", dcs_zero_init=False, lora_init="xavier",
                lora_task_bias=f"flow.module_list.0.subnet.s_layer1.task_biases.{first}" in state_dict,
                acl_layout="official")
    if n_acl:
        arch["acl_hidden_ratio"] = state_dict[f"acl_adapters.{first}.coupling_blocks.0.s_net.layers.0.weight"].shape[0] / dim
    return arch


def load_official_state_dict(state_dict: dict, *, lora_alpha: float = 1.0, clamp: float = 1.9,
                             alpha_max: float = 0.2) -> DeCoFlow:
    """The kit's ``DeCoFlow`` holding an official checkpoint's weights, tasks named as in it ("0", "1", ...).

    Every key must map (``kit_key``) and every tensor must have the shape the kit's model expects;
    otherwise OfficialImportError names the key. The base is frozen when the checkpoint holds more
    than one task (as after the official first task).
    """
    arch = official_architecture(state_dict, lora_alpha=lora_alpha, clamp=clamp, alpha_max=alpha_max)
    model = DeCoFlow(**arch)
    for task in _tasks(state_dict):
        model.add_task(task)
    target = model.state_dict()
    converted = {}
    for key, value in state_dict.items():
        name = kit_key(key)
        if name is None or name.endswith(".inv_perm"):
            continue  # inv_perm follows from perm
        if name not in target:
            raise OfficialImportError(f"official key {key!r} maps to {name!r}, which this model does not have "
                                      f"(an architecture the import does not know)")
        value = value.detach()
        if name.endswith(".perm"):
            value = _perm_from_matrix(value, key)
            converted[name[: -len("perm")] + "inv_perm"] = torch.argsort(value)
        elif name.endswith(".affine_scale"):
            value = 0.1 * F.softplus(value, beta=0.5)  # FrEIA's SOFTPLUS global affine
        if value.numel() != target[name].numel():
            raise OfficialImportError(f"official key {key!r}: shape {tuple(value.shape)} does not fit "
                                      f"{name} {tuple(target[name].shape)}")
        converted[name] = value.reshape(target[name].shape).to(target[name].dtype)
    missing = sorted(set(target) - set(converted) - {k for k in target if k.startswith("acl.") and "perm" in k})
    if missing:
        raise OfficialImportError(f"the official state dict lacks tensors the model needs, e.g. {missing[:3]}")
    model.load_state_dict(converted, strict=False)
    if len(model.tasks) > 1:
        model.freeze_base()
    return model.eval()
