"""Sample and anomaly-map galleries (notebooks 00 and 02)."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np

from ..data import load_category, load_image, mask_for
from ..features import load_batch
from ..report import load_run
from ..scoring import image_score, pixel_maps


def pick_test_samples(category, n_good: int = 1, n_defect: int = 2) -> list:
    """The first ``n_good`` good test samples and ``n_defect`` defects of distinct types where possible."""
    good = [s for s in category.test if s.label == 0][:n_good]
    defects, seen = [], set()
    for sample in category.test:
        if sample.label == 1 and sample.defect_type not in seen and len(defects) < n_defect:
            defects.append(sample)
            seen.add(sample.defect_type)
    rest = [s for s in category.test if s.label == 1 and s not in defects]
    return good + defects + rest[:n_defect - len(defects)]


def show_image(ax, image, mask=None, title: str = "") -> None:
    """An image with its defect mask outlined in red (nothing drawn for an empty mask)."""
    ax.imshow(image, cmap="gray" if np.ndim(image) == 2 else None)
    if mask is not None and np.any(mask):
        ax.contour(mask.astype(float), levels=[0.5], colors="red", linewidths=0.8)
    ax.set_title(title, fontsize=6)
    ax.axis("off")


def sample_gallery(root, tasks: list[str], n_good: int = 1, n_defect: int = 2):
    """One row per category: normal test images, then defects with their masks outlined (Sec. 4.1)."""
    cols = n_good + n_defect
    fig, axes = plt.subplots(len(tasks), cols, figsize=(1.5 * cols, 1.5 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        for ax, sample in zip(row, pick_test_samples(load_category(root, task), n_good, n_defect)):
            show_image(ax, load_image(sample.path, None), mask_for(sample, None), f"{task}: {sample.defect_type}")
    fig.tight_layout()
    return fig


def anomaly_map_examples(run_dir, root, tasks: list[str], n_per_task: int = 2) -> list[dict]:
    """Image, mask, anomaly map (Eq. 22 upsampled and smoothed, Sec. 3.9), score and routed task of
    the first defects of each task, scored by a finished run as its evaluation does (routed unless the
    run is an oracle one), with the map at the image's resolution rather than eval_size."""
    config, extractor, learner, device = load_run(run_dir)
    examples = []
    for task in tasks:
        samples = pick_test_samples(load_category(root, task), 0, n_per_task)
        patch, pooled = extractor(load_batch([s.path for s in samples], config.image_size, config.image_resize).to(device))
        routed = learner.route(pooled.cpu()) if learner.uses_router and config.task_agnostic else [task] * len(samples)
        for sample, patches, chosen in zip(samples, patch.cpu(), routed):
            nll = learner.patch_nll(chosen, patches[None])
            amap = pixel_maps(nll, config, config.image_size)[0].numpy()
            examples.append({"task": task, "routed": chosen, "image": load_image(sample.path, config.image_size),
                             "mask": mask_for(sample, config.image_size), "map": amap,
                             "score": float(image_score(nll, mode=config.score_mode, k=config.score_k)[0])})
    return examples


def map_gallery(examples: list[dict], per_row: int = 2):
    """Rows of (image with mask outline, anomaly map) pairs."""
    rows = math.ceil(len(examples) / per_row)
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(3 * per_row, 1.5 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        example = examples[k // 2] if k // 2 < len(examples) else None
        if example is None:
            continue
        if k % 2 == 0:
            show_image(ax, example["image"], example["mask"], f"{example['task']} (routed: {example['routed']})")
        else:
            ax.imshow(example["map"], cmap="inferno")
            ax.contour(example["mask"].astype(float), levels=[0.5], colors="cyan", linewidths=0.6)
            ax.set_title(f"anomaly map, score {example['score']:.1f}", fontsize=6)
    fig.tight_layout()
    return fig
