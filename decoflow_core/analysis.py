"""What the numbered notebooks compute, so that the notebooks stay thin.

``Context`` is one notebook's view of the kit: the task stream, the shared runs (trained once by
``experiments.ensure_run`` and reused by every later notebook), where figures and tables go, and
the JSON record of the numbers the notebook asserts on. The functions below it each serve one paper
item; their docstrings say which.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import files
from .config import Config, make_config
from .experiments import ensure_run, load_metrics

REPO = Path(__file__).resolve().parents[1]
QUICK_TASKS = 3
# sensitivity sweeps (rank, TAL) run on the first tasks only, except with PROFILE=paper
SENSITIVITY_TASKS = 5
# QUICK changes sizes only, never the code path: one epoch, a shallower flow, the embedded images'
# own 128 px, and pixel metrics at 64 x 64.
QUICK_SETS = {"epochs": 1, "n_dcs": 2, "n_acl": 1, "image_size": 128, "eval_size": 64}
PAPER_MVTEC = {"I-AUROC": 98.05, "P-AUROC": 97.81, "P-AP": 55.80, "FM (I-AUROC)": 0.0, "routing": 100.0}


# ----------------------------------------------------------------------------- notebook context
def task_stream(available: list[str], tasks: list[str] | None, quick: bool) -> list[str]:
    """The task order (Sec. 3.1): ``tasks`` as given, or every category alphabetically; QUICK keeps
    the first three."""
    stream = list(tasks) if tasks else sorted(available)
    unknown = [t for t in stream if t not in available]
    if unknown:
        raise ValueError(f"TASKS names {unknown}, which the data set does not hold; it has {sorted(available)}")
    return stream[:QUICK_TASKS] if quick else stream


def profile_sets(profile: str, sets: dict) -> dict:
    """``sets`` less the entries the profile already has, so equal configs share one run name."""
    base = make_config(profile)
    return {k: v for k, v in sets.items() if getattr(base, k) != v}


def kit_path(path) -> Path:
    """``path`` as given when absolute, else relative to the kit's folder (where make runs)."""
    path = Path(path)
    return path if path.is_absolute() else (REPO / path).resolve()


class Context:
    """Parameters of one notebook turned into the things its cells need."""

    def __init__(self, name: str, *, data: str, tasks, profile: str, seeds, quick: bool, run_root,
                 threads: int = 0, workers: int = 1):
        from .cli import resolve_data
        from .data import list_categories
        if threads:
            torch.set_num_threads(threads)  # on a shared CPU, oversubscribed threads cost several times over
        self.name, self.profile, self.quick = name, profile, bool(quick)
        self.workers = max(1, int(workers))
        self.seeds = list(seeds)
        self.run_root = Path(run_root).resolve()
        data_path = Path(data)
        if data != "embedded" and not data_path.is_absolute() and not data_path.exists():
            data = str(REPO / data_path)  # paths given relative to the kit (make reproduce DATA=...)
        self.data_spec = data
        self.data_root = Path(resolve_data(data))
        self.tasks = task_stream(list_categories(self.data_root), tasks, quick)
        quick_root = self.run_root / "quick"
        self.figures = quick_root / "figures" if quick else REPO / "figures"
        self.results = quick_root / "results" if quick else REPO / "results"
        self.record_file = self.run_root / "notebook_results" / f"{name}.json"
        self.recorded: dict = {}
        self._features: dict = {}

    def sets(self, **changes) -> dict:
        return profile_sets(self.profile, {**(QUICK_SETS if self.quick else {}), **changes})

    def config(self, **changes) -> Config:
        return make_config(self.profile, {k: str(v) for k, v in self.sets(**changes).items()})

    @property
    def sensitivity_stream(self) -> list[str]:
        """The stream of the sensitivity sweeps: the first SENSITIVITY_TASKS tasks unless PROFILE=paper."""
        return self.tasks if self.profile == "paper" else self.tasks[:SENSITIVITY_TASKS]

    def _job(self, method: str, seed: int | None = None, *, stream: list[str] | None = None,
             data: str | None = None, **changes) -> dict:
        seed = self.seeds[0] if seed is None else seed
        data = data or self.data_spec
        stream = list(stream or self.tasks)
        default_stream = data == self.data_spec and stream == task_stream(self.tasks_available(), None, False)
        return dict(method=method, data=data, tasks=None if default_stream else stream, profile=self.profile,
                    seed=seed, sets=self.sets(**changes))

    def run(self, method: str, seed: int | None = None, *, stream: list[str] | None = None,
            data: str | None = None, **changes) -> Path:
        """The run directory of ``method`` on ``stream`` (default: the notebook's task stream) of ``data``
        (default: the notebook's), trained now only if no notebook did it yet."""
        job = self._job(method, seed, stream=stream, data=data, **changes)
        out = ensure_run(self.run_root, **job)
        stream = list(stream or self.tasks)
        if job["data"] == self.data_spec and load_metrics(out)["tasks"] != stream:
            raise RuntimeError(f"{out} holds a run on other tasks than {stream}; delete it or use another RUN_ROOT")
        return out

    def prefetch(self, runs: list[tuple]) -> None:
        """Train the missing runs of [(method, seed, {keyword arguments of ``run``}), ...] in
        ``self.workers`` parallel processes; the ``run`` calls that follow then find them."""
        from .experiments import ensure_runs
        ensure_runs(self.run_root, [self._job(method, seed, **kw) for method, seed, kw in runs], self.workers)

    def tasks_available(self) -> list[str]:
        from .data import list_categories
        return list_categories(self.data_root)

    def features(self, **changes) -> dict:
        """{task: train.TaskData} of the stream's features (read from the feature cache)."""
        from .train import build_extractor, load_task, resolve_device
        config = self.config(**changes)
        key = tuple(getattr(config, k) for k in ("backbone", "backbone_weights", "image_size", "grid", "feature_dim",
                                                 "positional_encoding", "eval_size"))  # what TaskData depends on
        if key not in self._features:
            device = resolve_device(config.device)
            extractor = build_extractor(config)
            self._features[key] = {t: load_task(self.data_root, t, extractor, config, device) for t in self.tasks}
        return self._features[key]

    def figure(self, fig, name: str):
        """Save ``fig`` (PNG and PDF) and return the PNG for the notebook to show."""
        from .plots import save_figure
        png = save_figure(fig, name, self.figures)[0]
        try:
            from IPython.display import Image
        except ImportError:
            return png
        return Image(filename=str(png))

    def table(self, df: pd.DataFrame, name: str) -> list[Path]:
        return save_table(df, name, self.results)

    def record(self, key: str, value, meaning: str) -> None:
        """Add one number (or list) to the notebook's JSON record, with what it means."""
        self.recorded[key] = {"value": value, "meaning": meaning}
        files.write_json(self.record_file, {"notebook": self.name, "quick": self.quick, "tasks": self.tasks,
                                            "profile": self.profile, "seeds": self.seeds,
                                            "values": self.recorded})


# ----------------------------------------------------------------------------- tables
def markdown_table(df: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-style Markdown table of ``df`` (its columns, not its index); floats to ``digits``,
    except columns of whole numbers such as parameter counts (means over seeds come back as floats)."""
    def whole(column) -> bool:
        values = pd.to_numeric(df[column], errors="coerce").dropna()
        return df[column].dtype.kind == "f" and len(values) > 0 and bool((values % 1 == 0).all() and (values.abs() >= 10).any())

    def cell(value, as_int):
        if isinstance(value, (float, np.floating)):
            return "n/a" if math.isnan(value) else (f"{value:,.0f}" if as_int else f"{value:.{digits}f}")
        return "n/a" if value is None else str(value)
    header = [str(c) for c in df.columns]
    as_int = [whole(c) for c in df.columns]
    rows = [[cell(v, i) for v, i in zip(row, as_int)] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def save_table(df: pd.DataFrame, name: str, folder) -> list[Path]:
    """Write ``df`` as ``<folder>/<name>.csv`` and ``<folder>/<name>.md``; returns both paths."""
    folder = Path(folder)
    csv = files.write_text(folder / f"{name}.csv", df.to_csv(index=False))
    md = files.write_text(folder / f"{name}.md", markdown_table(df))
    return [csv, md]


def category_frame(summaries: list[dict]) -> pd.DataFrame:
    """The benchmark table (data.validate_tree summaries) as a DataFrame."""
    return pd.DataFrame([{"category": s["category"], "train good": s["train_good"], "test good": s["test_good"],
                          "test defect": sum(s["defects"].values()), "defect types": len(s["defects"]),
                          "masks": s["masks"]} for s in summaries])


def config_differences(config: dict, reference: str = "paper") -> pd.DataFrame:
    """Config fields where a run differs from a profile (default the paper's settings, Sec. 4.1)."""
    ref = make_config(reference).__dict__
    keys = [k for k in ref if k in config and config[k] != ref[k] and k not in ("feature_cache", "device")]
    shown = lambda value: "None" if value is None else value  # noqa: E731 -- None is a setting here, not a gap
    return pd.DataFrame({"setting": keys, "this run": [shown(config[k]) for k in keys],
                         f"{reference} profile": [shown(ref[k]) for k in keys]})


# ----------------------------------------------------------------------------- main results (Sec. 4.2)
def summary_row(metrics: dict) -> dict:
    """One run's headline numbers: final mean metrics, FM and BWT of image AUROC, routing, cost."""
    mean = metrics["mean"]
    return {"I-AUROC": mean["image_auroc"], "P-AUROC": mean["pixel_auroc"], "P-AP": mean["pixel_ap"],
            "FM (I-AUROC)": metrics["forgetting"]["image_auroc"], "BWT (I-AUROC)": metrics["bwt"]["image_auroc"],
            "routing": metrics["routing_accuracy"], "params/task": metrics["params"]["per_task"]}


def seed_table(rows: pd.DataFrame, by: str = "method") -> pd.DataFrame:
    """Mean over seeds of each numeric column per ``by``; with several seeds also "<col> std"."""
    numeric = [c for c in rows.columns if c not in (by, "seed")]
    grouped = rows.groupby(by, sort=False)[numeric]
    table = grouped.mean().astype(float)
    if rows["seed"].nunique() > 1:
        std = grouped.std().astype(float).add_suffix(" std")
        table = pd.concat([table, std], axis=1)[[c for n in numeric for c in (n, f"{n} std")]]
    return table.reset_index()


ORACLE = " (oracle task id)"


def oracle_view(metrics: dict) -> dict:
    """A routed run's metrics with the scores it recorded for the true task id (``metrics["oracle"]``)
    in place of the routed ones; routing is then not applicable."""
    if not metrics.get("oracle"):
        raise ValueError(f"the {metrics['method']} run has no oracle scores (only routed, task-agnostic runs do)")
    return {**metrics, **metrics["oracle"], "routing_accuracy": None}


def method_metrics(runs: dict) -> dict:
    """{label: [metrics, ...]} from {method: [run_dir, ...]}; for every routed run also the label
    "<method> (oracle task id)", the same model scored with the true task id."""
    out = {}
    for method, dirs in runs.items():
        out[method] = [load_metrics(d) for d in dirs]
        if out[method] and all(m.get("oracle") for m in out[method]):
            out[method + ORACLE] = [oracle_view(m) for m in out[method]]
    return out


def per_task_table(runs: dict, metric: str = "image_auroc") -> pd.DataFrame:
    """Final ``metric`` per task (rows, plus "mean") and method (columns), averaged over seeds.

    runs: {method: [metrics dict, ...]} (see ``method_metrics``) with the same task list everywhere.
    """
    columns = {}
    for method, seeds in runs.items():
        finals = [[m["final"][t][metric] for t in m["tasks"]] for m in seeds]
        columns[method] = np.nanmean(np.array(finals, dtype=float), axis=0) if finals else []
    tasks = next(iter(runs.values()))[0]["tasks"]
    df = pd.DataFrame(columns, index=tasks)
    df.loc["mean"] = df.mean(axis=0)
    return df.rename_axis("task").reset_index()


def forgetting_row(metrics: dict) -> dict:
    """FM and BWT of every metric of one run (Sec. 4.2, Table 3; definitions in metrics.py)."""
    names = {"image_auroc": "I-AUROC", "pixel_auroc": "P-AUROC", "pixel_ap": "P-AP"}
    row = {}
    for key, label in names.items():
        row[f"FM ({label})"] = metrics["forgetting"][key]
        row[f"BWT ({label})"] = metrics["bwt"][key]
    return row


def first_task_curve(R: np.ndarray) -> np.ndarray:
    """R[i][0] for i = 0..T-1: the first task's score after each task of the stream (Fig. 3)."""
    return np.asarray(R, dtype=float)[:, 0]


# ----------------------------------------------------------------------------- images and maps
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
    import matplotlib.pyplot as plt
    from .data import load_category, load_image, mask_for
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
    from .data import load_category, load_image, mask_for
    from .features import load_batch
    from .report import load_run
    from .scoring import anomaly_map, image_score
    config, extractor, learner, device = load_run(run_dir)
    examples = []
    for task in tasks:
        samples = pick_test_samples(load_category(root, task), 0, n_per_task)
        patch, pooled = extractor(load_batch([s.path for s in samples], config.image_size).to(device))
        routed = learner.route(pooled.cpu()) if learner.uses_router and config.task_agnostic else [task] * len(samples)
        for sample, patches, chosen in zip(samples, patch.cpu(), routed):
            nll = learner.patch_nll(chosen, patches[None])
            amap = anomaly_map(nll, config.image_size, sigma=config.map_sigma)[0].numpy()
            examples.append({"task": task, "routed": chosen, "image": load_image(sample.path, config.image_size),
                             "mask": mask_for(sample, config.image_size), "map": amap,
                             "score": float(image_score(nll, mode=config.score_mode, k=config.score_k)[0])})
    return examples


def map_gallery(examples: list[dict], per_row: int = 2):
    """Rows of (image with mask outline, anomaly map) pairs."""
    import matplotlib.pyplot as plt
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


# ----------------------------------------------------------------------------- features (Sec. 3.4)
def backbone_table(extractor, image_size: int) -> pd.DataFrame:
    """The backbone stages the patch features come from: channels, stride, map size, pooled grid."""
    info = extractor.body.feature_info
    return pd.DataFrame({"stage": info.module_name(), "channels": info.channels(), "stride": info.reduction(),
                         "map size": [f"{image_size // r}x{image_size // r}" for r in info.reduction()],
                         "pooled to": f"{extractor.grid}x{extractor.grid}"})


def time_feature_extraction(extractor, paths, image_size: int, cache_dir) -> dict:
    """Seconds to get features of ``paths``: without a cache, on the run that writes it, and cached."""
    import time
    from .features import extract_features
    seconds = {}
    for label, cache in (("no cache", None), ("first run, writes cache", cache_dir), ("cached", cache_dir)):
        start = time.perf_counter()
        extract_features(extractor, paths, image_size=image_size, cache_dir=cache, desc=label)
        seconds[label] = time.perf_counter() - start
    return seconds


def task_separation(pooled: dict) -> pd.DataFrame:
    """Pairs of tasks by how far apart their pooled features are (the router's view, Sec. 3.8):
    centroid distance divided by the mean RMS spread of the two tasks; below ~1 they overlap."""
    names = list(pooled)
    feats = {t: np.asarray(x, dtype=float) for t, x in pooled.items()}
    centre = {t: x.mean(axis=0) for t, x in feats.items()}
    spread = {t: np.sqrt(((x - centre[t]) ** 2).sum(axis=1).mean()) for t, x in feats.items()}
    rows = [{"task a": a, "task b": b,
             "separation": float(np.linalg.norm(centre[a] - centre[b]) / ((spread[a] + spread[b]) / 2))}
            for i, a in enumerate(names) for b in names[i + 1:]]
    return pd.DataFrame(rows).sort_values("separation").reset_index(drop=True)


# ----------------------------------------------------------------------------- SVD of Delta W (Sec. 4.4.3)
def cumulative_energy(delta) -> np.ndarray:
    """Share of ||Delta W||_F^2 in the top r singular values, for r = 1..min(m, n) (ends at 1)."""
    s = np.linalg.svd(np.asarray(delta, dtype=np.float64), compute_uv=False)
    cumulative = np.cumsum(s ** 2)
    # dividing by the last partial sum (not a separate total) makes the curve end at exactly 1.0
    return cumulative / cumulative[-1] if cumulative[-1] > 0 else np.ones_like(cumulative)


def energy_at_rank(delta, rank: int) -> float:
    """Share of the energy of Delta W captured by its best rank-``rank`` approximation (Eckart-Young)."""
    curve = cumulative_energy(delta)
    return float(curve[min(rank, len(curve)) - 1])


def mean_energy_curve(curves: list) -> np.ndarray:
    """Mean of cumulative-energy curves of different lengths: past its full rank a curve stays at 1."""
    length = max(len(c) for c in curves)
    mean = np.mean([np.concatenate([c, np.ones(length - len(c))]) for c in curves], axis=0)
    return np.minimum(mean, 1.0)  # float rounding of the average must not exceed a share of 1


def random_energy(shape, rank: int, seed: int = 0) -> float:
    """energy_at_rank of a Gaussian matrix of ``shape``: what a ΔW without low-rank structure gives."""
    return energy_at_rank(np.random.default_rng(seed).standard_normal(shape), rank)


def base_linears(model) -> dict:
    """The shared (base) nn.Linear of every LoRA layer in the DCS blocks, by name."""
    from .flow import LoRALinear
    return {name: module.base for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def first_task_model(run_dir):
    """(config, model) of a decoflow run right after its first task: base + that task's parameters."""
    from .methods import build_flow
    run_dir = Path(run_dir)
    meta = files.read_json(run_dir / "config.json")
    config = Config(**meta["config"])
    model = build_flow(config, meta["feature_dim"])
    task_file = sorted((run_dir / "checkpoints").glob("task_00_*.pt"))[0]
    model.load_task_state_dict(meta["tasks"][0], torch.load(task_file, map_location="cpu", weights_only=False))
    model.load_base_state_dict(torch.load(run_dir / "checkpoints" / "base.pt", map_location="cpu", weights_only=False))
    return config, model


def full_finetune_delta(model, task: str, patches: torch.Tensor, config: Config, *, seed: int) -> dict:
    """Delta W = W_after - W_before of every base Linear when a new task fine-tunes ALL base weights.

    The new task gets its own TSA, SCM gate and ACL as in DeCoFlow, but no LoRA: its adapters stay at
    B = 0 and out of the optimizer, so the base alone absorbs the change LoRA would carry (Sec. 4.4.3).
    ``model`` is left untouched.
    """
    from .flow import LoRALinear
    from .methods import fit
    model = copy.deepcopy(model)
    before = {k: lin.weight.detach().clone() for k, lin in base_linears(model).items()}
    model.add_task(task)
    model.set_task(task)
    lora = [p for m in model.modules() if isinstance(m, LoRALinear) for p in m.task_parameters(task).values()]
    for p in lora:
        p.requires_grad_(False)
    params = model.base_parameters() + [p for p in model.task_parameters(task) if all(p is not q for q in lora)]
    for p in params:
        p.requires_grad_(True)
    fit(model, params, patches, config, seed=seed, desc=f"{task} full fine-tune")
    return {k: (lin.weight.detach() - before[k]).numpy() for k, lin in base_linears(model).items()}


def delta_w_table(deltas: dict, profile_rank: int, paper_ranks: dict, paper_rank: int = 64) -> pd.DataFrame:
    """Per layer: shape, full rank, energy in the top 64, at the profile's rank, and at the rank that is
    the same fraction of the layer's full rank as 64 is of the paper-sized layer's."""
    rows = []
    for name, delta in deltas.items():
        full = min(delta.shape)
        matched = max(1, math.ceil(full * paper_rank / paper_ranks[name]))
        rows.append({"layer": name, "shape": f"{delta.shape[0]}x{delta.shape[1]}", "full rank": full,
                     f"energy@{paper_rank}": energy_at_rank(delta, paper_rank),
                     f"top {paper_rank} is full rank": full <= paper_rank,
                     f"energy@{profile_rank} (profile rank)": energy_at_rank(delta, profile_rank),
                     "matched rank": matched, "energy@matched rank": energy_at_rank(delta, matched)})
    return pd.DataFrame(rows)


def paper_layer_ranks(names) -> dict:
    """Full rank of the same base Linear layers in the paper-sized flow (D = 768, Sec. 4.1)."""
    from .methods import build_flow
    paper = make_config("paper")
    layers = base_linears(build_flow(paper.replace(n_dcs=max(int(n.split(".")[1]) for n in names) + 1), 768))
    return {n: min(layers[n].weight.shape) for n in names}


# ----------------------------------------------------------------------------- TAL gradients (Sec. 4.4.4)
def patch_feature_gradients(model, x: torch.Tensor, config: Config) -> tuple[np.ndarray, np.ndarray]:
    """(patch NLL, ||dL/dx_p||_2) for every patch p of a batch x (B, D, H, W), L = TAL of ``config``.

    The gradient is taken w.r.t. the patch features that enter the flow model (before TSA). With
    lambda_tail = 0 the loss is the plain mean NLL.
    """
    from .methods import training_loss
    from .losses import patch_nll
    x = x.clone().requires_grad_(True)
    loss = training_loss(model, x, config)
    (grad,) = torch.autograd.grad(loss, x)
    with torch.no_grad():
        nll = patch_nll(model.log_prob(x), dim=model.dim)
    return nll.flatten().numpy(), grad.norm(dim=1).flatten().numpy()


def tail_share(grad_norms, nll, top_k: float) -> float:
    """Share of the summed per-patch gradient magnitude carried by the top-k fraction of patches by NLL."""
    grad_norms, nll = np.asarray(grad_norms, float), np.asarray(nll, float)
    k = max(1, math.ceil(top_k * nll.size))
    tail = np.argsort(-nll, kind="stable")[:k]
    return float(grad_norms[tail].sum() / grad_norms.sum())


def expected_tail_weight(lambda_tail: float, top_k: float) -> float:
    """Share of dL/dNLL that Eq. 21 puts on the top-k patches: (1 - lambda) k + lambda."""
    return (1 - lambda_tail) * top_k + lambda_tail


# ----------------------------------------------------------------------------- routing (Sec. 3.8, 4.4.6)
def routing_confusion(train: dict, test: dict, **router_options) -> tuple[np.ndarray, float]:
    """(confusion counts true x routed, accuracy) of a PrototypeRouter fit on ``train`` pooled features
    and tested on ``test`` ({task: (N, G)}, same task order)."""
    from .router import PrototypeRouter
    router = PrototypeRouter(**router_options)
    for task, feats in train.items():
        router.add_task(task, feats)
    tasks = list(train)
    confusion = np.zeros((len(tasks), len(tasks)), dtype=int)
    for i, task in enumerate(tasks):
        for routed in router.route(test[task]):
            confusion[i, tasks.index(routed)] += 1
    return confusion, float(np.trace(confusion) / confusion.sum())


def routing_errors(confusion, tasks: list[str]) -> pd.DataFrame:
    """Every off-diagonal cell of a routing confusion matrix: (true task, routed to, images)."""
    confusion = np.asarray(confusion)
    rows = [{"true task": tasks[i], "routed to": tasks[j], "images": int(confusion[i, j])}
            for i, j in zip(*np.nonzero(confusion)) if i != j]
    return pd.DataFrame(rows, columns=["true task", "routed to", "images"])


def row_normalise(confusion) -> np.ndarray:
    confusion = np.asarray(confusion, dtype=float)
    return confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)

