"""``python -m decoflow_core bench``: throughput, training step time and latency on this machine
(numbers, not tests)."""
from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

from .config import make_config
from .data import list_categories, load_category
from .features import extract_features, load_batch
from .methods import fit, make_learner
from .train import build_extractor, resolve_device


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


def benchmark(*, data: Path, task: str | None, profile: str, sets: dict, n_images: int = 64, steps: int = 3,
              whole_task: bool = True) -> dict:
    """Feature extraction, seconds per training step, (``whole_task``) training one task, and the
    per-image latency of backbone and flow + router, printed and returned."""
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
                             cache_dir=None,
                             device=device, desc="bench features")
    extraction = len(category.train) / (time.perf_counter() - start)

    dim = train["patch"].shape[1]
    seconds_per_step = step_seconds(make_learner("decoflow", config, dim, device), train["patch"], config, steps)
    learner = make_learner("decoflow", config, dim, device)
    train_seconds = None
    if whole_task:
        start = time.perf_counter()
        learner.learn(task, train, seed=0)
        train_seconds = time.perf_counter() - start
    else:  # untrained adapters: the latency below is the same
        learner.model.add_task(task)
        learner.router.add_task(task, train["pooled"])

    backbone_ms, flow_ms = [], []
    for path in paths[:16]:
        start = time.perf_counter()
        patch, pooled = extractor(load_batch([path], config.image_size, config.image_resize).to(device))
        middle = time.perf_counter()
        routed = learner.route(pooled.cpu())[0]
        learner.patch_nll(routed, patch.cpu())
        end = time.perf_counter()
        backbone_ms.append(1000 * (middle - start))
        flow_ms.append(1000 * (end - middle))
    result = {
        "profile": profile, "device": device, "threads": torch.get_num_threads(), "task": task,
        "feature_extraction_images_per_s": extraction, "feature_dim": dim, "grid": config.grid,
        "batch_size": config.batch_size, "rank": config.rank, "train_seconds_per_step": seconds_per_step,
        "train_seconds_per_task": train_seconds, "train_images": len(category.train), "epochs": config.epochs,
        "inference_ms_backbone": sum(backbone_ms) / len(backbone_ms),
        "inference_ms_flow_and_router": sum(flow_ms) / len(flow_ms),
        "peak_memory_mib": _peak_rss_mib(),
    }
    if device == "cuda":
        result["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.2f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return result
