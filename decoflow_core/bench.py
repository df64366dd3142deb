"""What the kit costs: ``python -m decoflow_core bench`` (throughput, training step time and latency on
this machine; numbers, not tests) and ``params`` (parameter counts)."""
from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np
import torch

from .backbone import feature_channels
from .config import Config, make_config
from .data import list_categories, load_category
from .features import extract_features, load_batch
from .learners import make_learner
from .model import build_flow
from .train import build_extractor, fit, learn, resolve_device


def parameter_counts(config: Config, dim: int | None = None) -> dict:
    """Base and per-task parameters of the config's flow on ``dim`` channels (default the config's
    feature size), in total and by module."""
    dim = dim or config.feature_dim or feature_channels(config.backbone)
    model = build_flow(config, dim)
    model.add_task("0")
    counts, breakdown = model.count_parameters(), model.parameter_breakdown()
    return {"dim": dim, "base": counts["base"], "per_task": counts["per_task"],
            "base_by_module": breakdown["base"], "per_task_by_module": breakdown["per_task"]}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def step_seconds(learner, patches: torch.Tensor, config, steps: int) -> float:
    """Seconds per training step of the first task's flow (the base and its adapters) at the profile's
    batch size, loss, optimiser and clipping, after one warm-up step."""
    batches = patches[: config.batch_size].repeat(steps + 1, 1, 1, 1)
    model = learner.model
    model.add_task("bench")
    model.set_task("bench")
    one_epoch = config.replace(epochs=1, drop_last=False)
    fit(model, model.trainable_parameters(), batches[: config.batch_size], one_epoch, seed=0)  # warm-up
    start = time.perf_counter()
    fit(model, model.trainable_parameters(), batches[config.batch_size:], one_epoch, seed=0)
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def latency(extractor, learner, images: torch.Tensor, repeats: int = 1) -> dict:
    """Median milliseconds per image for backbone, router and flow, one image at a time (wall time)."""
    parts = {"backbone": [], "router": [], "flow": []}
    for _ in range(repeats):
        for image in images:
            t0 = time.perf_counter()
            patch, pooled = extractor(image[None])
            t1 = time.perf_counter()
            task = learner.route(pooled.cpu())[0] if learner.uses_router else None
            t2 = time.perf_counter()
            learner.patch_nll(task, patch.cpu())
            t3 = time.perf_counter()
            for key, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[key].append(1000 * seconds)
    return {f"{key} ms": float(np.median(values)) for key, values in parts.items()}


def benchmark(*, data: Path, task: str | None, profile: str, sets: dict, n_images: int = 64, steps: int = 3,
              whole_task: bool = True) -> dict:
    """Feature extraction, seconds per training step, (``whole_task``) training one task, and the
    median per-image latency of backbone, router and flow, printed and returned."""
    config = make_config(profile, sets)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    task = task or list_categories(data)[0]
    category = load_category(data, task)
    extractor = build_extractor(config).to(device)
    paths = category.train[:n_images]

    start = time.perf_counter()
    train = extract_features(extractor, category.train, image_size=config.image_size, resize=config.image_resize,
                             cache_dir=None, device=device, desc="bench features")
    extraction = len(category.train) / (time.perf_counter() - start)

    dim = train["patch"].shape[1]
    seconds_per_step = step_seconds(make_learner("decoflow", config, dim, device), train["patch"], config, steps)
    learner = make_learner("decoflow", config, dim, device)
    train_seconds = None
    if whole_task:
        start = time.perf_counter()
        learn(learner, task, train, seed=0)
        train_seconds = time.perf_counter() - start
    else:  # untrained adapters: the latency below is the same
        learner.model.add_task(task)
        learner.router.add_task(task, train["pooled"])

    images = torch.cat([load_batch([path], config.image_size, config.image_resize) for path in paths[:16]]).to(device)
    latency(extractor, learner, images[:1])  # warm-up
    per_image = latency(extractor, learner, images)
    result = {
        "profile": profile, "device": device, "threads": torch.get_num_threads(), "task": task,
        "feature_extraction_images_per_s": extraction, "feature_dim": dim, "grid": config.grid,
        "batch_size": config.batch_size, "rank": config.rank, "train_seconds_per_step": seconds_per_step,
        "train_seconds_per_task": train_seconds, "train_images": len(category.train), "epochs": config.epochs,
        "inference_ms_backbone": per_image["backbone ms"], "inference_ms_router": per_image["router ms"],
        "inference_ms_flow": per_image["flow ms"],
        "inference_ms_flow_and_router": per_image["router ms"] + per_image["flow ms"],
        "flow_and_router_share_of_backbone": (per_image["router ms"] + per_image["flow ms"]) / per_image["backbone ms"],
        "peak_memory_mib": _peak_rss_mib(),
    }
    if device == "cuda":
        result["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.2f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return result
