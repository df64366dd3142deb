"""Where DeCoFlow loses to the PaDiM-style reference on one real task: an analysis, used for no choice.

    .venv/bin/python scripts/real_ad_analysis.py RUN_DIR... [--task magnetic_tile] > results/real_ad_analysis.md

For each flow run (scored with the task's own parameters): how much higher the mean training NLL is
on the outer ring of the patch grid than in its centre, and on what share of the good test images the
highest-scoring patch lies on that ring. Then image AUROC per defect type of two Gaussians on the same
features as the first run: one per patch position (PaDiM-style) and one shared by all positions.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decoflow_core import files  # noqa: E402
from decoflow_core.analysis.context import markdown_table  # noqa: E402
from decoflow_core.config import Config  # noqa: E402
from decoflow_core.learners.baselines import PaDiMReference  # noqa: E402
from decoflow_core.metrics import image_auroc, image_auroc_by_type  # noqa: E402
from decoflow_core.report import load_run  # noqa: E402
from decoflow_core.scoring import image_score  # noqa: E402
from decoflow_core.train import learn, load_task  # noqa: E402


def ring_mask(grid: int) -> torch.Tensor:
    ring = torch.zeros(grid, grid, dtype=torch.bool)
    ring[[0, -1]] = True
    ring[:, [0, -1]] = True
    return ring


def load(run: Path, task: str):
    """(config, learner, task data) of a run directory, on the data it was trained on."""
    config, extractor, learner, device = load_run(run)
    data = load_task(Path(files.read_json(run / "config.json")["data"]), task, extractor, config, device)
    return config, learner, data


def border_row(run: Path, task: str, config, learner, data) -> dict:
    train_nll = learner.patch_nll(task, data.train["patch"]).mean(0)
    test_nll = learner.patch_nll(task, data.test["patch"])
    ring = ring_mask(train_nll.shape[-1])
    top = test_nll.flatten(1).argmax(1)
    good = torch.from_numpy(data.labels == 0)
    return {"run": run.name, "standardize": config.standardize,
            "ring - centre train NLL (nats)": float(train_nll[ring].mean() - train_nll[~ring].mean()),
            "good test images with top patch on the ring": float(ring.flatten()[top][good].float().mean()),
            "I-AUROC": image_auroc(data.labels, image_score(test_nll, k=config.score_k).numpy())}


def gaussian_scores(train: torch.Tensor, test: torch.Tensor, per_position: bool, reg: float = 0.01):
    """Squared Mahalanobis distance of every test patch (N, D, H, W) -> (N, H, W): the PaDiM-style
    reference, or (``per_position=False``) the same with every patch a sample of one shared position."""
    if per_position:
        padim = PaDiMReference(Config(), train.shape[1], "cpu", reg=reg)
        learn(padim, "task", {"patch": train}, seed=0)
        return padim.patch_nll("task", test.float()).to(test.dtype)
    as_one_position = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1], 1, 1)  # (N*H*W, D, 1, 1)
    n, _, h, w = test.shape
    return gaussian_scores(as_one_position(train), as_one_position(test), True, reg).reshape(n, h, w)


def gaussian_rows(config, data) -> list[dict]:
    types = [s.defect_type for s in data.category.test]
    rows = []
    for per_position in (True, False):
        scores = image_score(gaussian_scores(data.train["patch"], data.test["patch"], per_position),
                             k=config.score_k).numpy()
        rows.append({"Gaussian": "one per position" if per_position else "one for all positions",
                     "I-AUROC": image_auroc(data.labels, scores), **image_auroc_by_type(types, scores)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--task", default="magnetic_tile")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    loaded = [load(run, args.task) for run in args.runs]
    flows = pd.DataFrame([border_row(run, args.task, *parts) for run, parts in zip(args.runs, loaded)])
    print(f"# Where the flow loses on {args.task} (analysis; no setting was chosen by it)\n")
    print("## Border patches\n")
    print(markdown_table(flows, digits=3))
    print(f"\n## Gaussians on the features of {args.runs[0].name}: image AUROC, all and per defect type\n")
    config, _, data = loaded[0]
    print(markdown_table(pd.DataFrame(gaussian_rows(config, data)), digits=3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
