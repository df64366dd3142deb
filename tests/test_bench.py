"""Per-image latency (bench.latency) with stand-in extractor and learner whose costs are known."""
from __future__ import annotations

import time

import torch
from torch import nn

from decoflow_core import bench


class _Extractor(nn.Module):
    """(patch features (1, 4, 2, 2), pooled (1, 4)) of one image (1, 3, 8, 8)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, image):
        self.calls += 1
        assert image.shape == (1, 3, 8, 8)
        patch = nn.functional.adaptive_avg_pool2d(image.repeat(1, 2, 1, 1)[:, :4], 2)
        return patch, patch.mean(dim=(2, 3))


class _Learner:
    def __init__(self, uses_router: bool, sleep_route: float = 0.0, sleep_flow: float = 0.0):
        self.uses_router = uses_router
        self.sleep_route, self.sleep_flow = sleep_route, sleep_flow
        self.routed, self.scored = [], []

    def route(self, pooled):
        assert pooled.shape == (1, 4)
        self.routed.append(pooled)
        time.sleep(self.sleep_route)
        return ["task_b"]

    def patch_nll(self, task, patch):
        assert patch.shape == (1, 4, 2, 2)
        self.scored.append(task)
        time.sleep(self.sleep_flow)
        return torch.zeros(1, 2, 2)


def _images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_latency_routes_every_image_and_scores_it_with_the_routed_task():
    extractor, learner = _Extractor(), _Learner(uses_router=True)
    out = bench.latency(extractor, learner, _images(3), repeats=2)
    assert set(out) == {"backbone ms", "router ms", "flow ms"}
    assert all(isinstance(v, float) and v >= 0 for v in out.values())
    assert extractor.calls == 6 and len(learner.routed) == 6
    assert learner.scored == ["task_b"] * 6


def test_latency_without_a_router_never_routes():
    extractor, learner = _Extractor(), _Learner(uses_router=False)
    out = bench.latency(extractor, learner, _images(2))
    assert set(out) == {"backbone ms", "router ms", "flow ms"}
    assert all(v >= 0 for v in out.values())
    assert learner.routed == [] and learner.scored == [None, None]


def test_latency_charges_each_part_its_own_time():
    out = bench.latency(_Extractor(), _Learner(uses_router=True, sleep_route=0.004), _images(2))
    assert out["router ms"] >= 4.0
    out = bench.latency(_Extractor(), _Learner(uses_router=True, sleep_flow=0.004), _images(2))
    assert out["flow ms"] >= 4.0
