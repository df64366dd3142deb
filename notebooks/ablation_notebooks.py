"""Cells of the ablation and analysis notebooks 07-11 (paper Sec. 4.3-4.4); build_notebooks.py
writes them. Same conventions as 00-06: a `parameters` cell, thin cells calling decoflow_core,
figures and tables through the notebook context, numbers recorded in runs/notebook_results/.
"""

BUDGET = """
**Budget.** With `PROFILE="cpu"` these runs use the first {tasks} tasks of the stream and {epochs}
epochs per task (`decoflow_core/ablations.py`: `ABLATION_TASKS`, `ABLATION_EPOCHS`) so that the
whole kit reproduces in well under an hour on a 2-core CPU; with `PROFILE="paper"` (or `"official"`) they run the full
protocol. `QUICK=True` shrinks further (3 tasks, 1 epoch, a 2-block flow) and only checks the plumbing.
"""


def notebooks(common_parameters: str, setup_cell) -> dict:
    from decoflow_core.ablations import ABLATION_EPOCHS, ABLATION_TASKS
    budget = BUDGET.format(tasks=ABLATION_TASKS, epochs=ABLATION_EPOCHS)
    nbs = {}

    # ----------------------------------------------------------------------------------------- 07
    nbs["07_component_ablation"] = [
        ("md", """
# 07 · Component ablation and the base × components interaction

Paper Sec. 4.3.1-4.3.2. **Leave-one-out**: the full model against the model without one of
TSA (task-specific alignment), SCM (spatial context mixer), TAL (tail-aware loss: λ_tail = 0) or ACL
(affine coupling layers per task). **2×2 design**: base frozen after task 0 (DeCoFlow) or trainable on
every task, with the four components absent or present; the interaction is (effect of the
components with a frozen base) − (their effect with a trainable base). Every number is a mean ± std over
`ABLATION_SEEDS`; a difference is called *within seed noise* when |mean| ≤ 2 standard errors of the
paired (same seed) differences. Last, TSA's per-patch standardisation (Eq. 7) on and off on real data.
""" + budget),
        ("parameters", common_parameters + """ABLATION_SEEDS = [0, 1, 2]  # seeds of every ablation run (QUICK: the first two)
REAL_DATA = "../shared/data/real_ad"  # MVTec-layout real data for the standardisation test (kit-relative); None skips it
REAL_TASKS = ["bottle", "magnetic_tile"]  # its categories used here
"""),
        ("code", setup_cell("07_component_ablation", "from decoflow_core import ablations\nfrom decoflow_core.experiments import load_metrics")),
        ("code", """
stream, changes = ablations.ablation_plan(ctx)
seeds = ABLATION_SEEDS[:2] if ctx.quick else ABLATION_SEEDS
VARIANTS = {"full": {}, **{f"without {name}": change for name, change in ablations.COMPONENTS.items()}}
CELLS = {("frozen", "present"): {}, ("frozen", "absent"): ablations.ALL_COMPONENTS_OFF,
         ("trainable", "present"): {"freeze_base": False},
         ("trainable", "absent"): {**ablations.ALL_COMPONENTS_OFF, "freeze_base": False}}
configs = list(VARIANTS.values()) + list(CELLS.values())
ctx.prefetch([("decoflow", seed, dict(stream=stream, **changes, **c)) for c in configs for seed in seeds])
metrics = lambda change, seed: load_metrics(ctx.run("decoflow", seed, stream=stream, **changes, **change))
print(f"stream: {stream}; changes from the {ctx.profile} profile: {changes}; seeds: {seeds}")
"""),
        ("md", "## Leave-one-out"),
        ("code", """
rows = pd.DataFrame([{"variant": name, "seed": seed, **analysis.summary_row(metrics(change, seed))}
                     for name, change in VARIANTS.items() for seed in seeds])
table = analysis.seed_table(rows, by="variant")
per_metric = {value: ablations.paired_effects(rows, "full", value) for value in ("I-AUROC", "P-AUROC", "P-AP")}
effects = pd.concat(per_metric.values(), axis=1)
effects = effects.loc[:, ~effects.columns.duplicated()]  # std, seeds and noise columns: those of I-AUROC
ctx.table(table, "07_leave_one_out")
ctx.table(effects, "07_leave_one_out_effects")
for row in effects.to_dict("records"):
    for value in ("I-AUROC", "P-AUROC", "P-AP"):
        ctx.record(f"{row['variant']}/delta_{value}", row[f"Δ {value}"], f"mean over seeds of ({row['variant']} − full) {value}")
ctx.record("loo/std_I-AUROC", [float(v) for v in effects["std over seeds"]], "std over seeds of each variant's Δ I-AUROC")
ctx.record("loo/within_noise", effects["within seed noise"].tolist(), "is each variant's Δ I-AUROC within seed noise")
ctx.record("full/I-AUROC", float(table.loc[table.variant == "full", "I-AUROC"].iloc[0]), "mean I-AUROC of the full model")
display(table)
effects
"""),
        ("code", """
fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), constrained_layout=True)
for ax, (value, e) in zip(axes, per_metric.items()):
    ax.bar(e["variant"], e[f"Δ {value}"], yerr=e["std over seeds"].fillna(0), capsize=4, color="tab:red")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_title(f"Δ {value} vs full model")
    ax.tick_params(axis="x", rotation=30)
ctx.figure(fig, "07_leave_one_out")
"""),
        ("md", "## Base frozen or trainable × components absent or present"),
        ("code", """
cell_rows = pd.DataFrame([{"base": base, "components": comp, "seed": seed, **analysis.summary_row(metrics(change, seed))}
                          for (base, comp), change in CELLS.items() for seed in seeds])
grid = cell_rows.groupby(["base", "components"])[["I-AUROC", "FM (I-AUROC)"]].agg(["mean", "std"])
per_seed = [ablations.interaction_effect({(b, c): v for b, c, v in zip(g["base"], g["components"], g["I-AUROC"])})
            for _, g in cell_rows.groupby("seed")]
inter = pd.DataFrame(per_seed)
summary = inter.agg(["mean", "std"]).T.reset_index(names="quantity")
ctx.table(grid.reset_index().set_axis(["base", "components", "I-AUROC", "I-AUROC std", "FM", "FM std"], axis=1), "07_base_x_components")
ctx.table(summary, "07_interaction")
for row in summary.to_dict("records"):
    ctx.record(f"2x2/{row['quantity']}", row["mean"], f"{row['quantity']} on mean I-AUROC (frozen − trainable effect of the components), mean over seeds")
for (base, comp), values in grid.iterrows():
    ctx.record(f"2x2/{base}_{comp}/I-AUROC", values[("I-AUROC", "mean")], f"mean I-AUROC, base {base}, components {comp}")
    ctx.record(f"2x2/{base}_{comp}/FM", values[("FM (I-AUROC)", "mean")], f"FM of I-AUROC, base {base}, components {comp}")
display(grid)
summary
"""),
        ("code", """
fig, axes = plt.subplots(1, 2, figsize=(9, 3.3), constrained_layout=True)
for ax, value in zip(axes, ("I-AUROC", "FM (I-AUROC)")):
    for comp, style in (("absent", "o--"), ("present", "s-")):
        means = [grid.loc[(base, comp), (value, "mean")] for base in ("frozen", "trainable")]
        stds = [grid.loc[(base, comp), (value, "std")] for base in ("frozen", "trainable")]
        ax.errorbar(["frozen", "trainable"], means, yerr=np.nan_to_num(stds), fmt=style, capsize=4, label=f"components {comp}")
    ax.set_xlabel("base after task 0")
    ax.set_ylabel(value)
    ax.legend()
axes[0].set_title(f"interaction = {summary.set_index('quantity').loc['interaction', 'mean']:+.3f}")
ctx.figure(fig, "07_interaction")
"""),
        ("md", """
## TSA's standardisation on real data

Eq. 7 normalises every patch's channels to zero mean and unit variance before the task's affine map.
That removes each patch's overall intensity, and some real defects (uneven brightness on magnetic
tiles) consist of little else. Same ablation budget, on `REAL_DATA`. (The `cpu` profile runs without
Eq. 7, a choice made on held-out synthetic defects — README, "Settings chosen on held-out data"; the
ablations above therefore already run without it.)
"""),
        ("code", """
real = analysis.kit_path(REAL_DATA) if REAL_DATA else None
if real is None or not real.is_dir():
    print(f"no real data at {REAL_DATA!r}: skipped")
    ctx.record("standardize/skipped", True, "the real data set was not found")
else:
    real_tasks = [t for t in REAL_TASKS if (real / t).is_dir()]
    real_run = lambda seed, on: ctx.run("decoflow", seed, data=str(real), stream=real_tasks, **changes, standardize=on)
    real_run(seeds[0], True)  # extracts the features once, before parallel runs could both do it
    ctx.prefetch([("decoflow", seed, dict(data=str(real), stream=real_tasks, standardize=on, **changes))
                  for seed in seeds for on in (True, False)])
    std_rows = pd.DataFrame([{"task": task, "standardize": on, "seed": seed, "I-AUROC": m["final"][task]["image_auroc"],
                              "P-AUROC": m["final"][task]["pixel_auroc"], "P-AP": m["final"][task]["pixel_ap"]}
                             for seed in seeds for on in (True, False) for m in [load_metrics(real_run(seed, on))]
                             for task in real_tasks])
    std_table = std_rows.groupby(["task", "standardize"])[["I-AUROC", "P-AUROC", "P-AP"]].agg(["mean", "std"])
    ctx.table(std_table.reset_index().set_axis(["task", "standardize"] + [f"{a} {b}" for a, b in std_table.columns], axis=1), "07_standardize_real")
    for task in real_tasks:
        sub = std_rows[std_rows.task == task].assign(variant=lambda d: d.standardize.map({True: "on", False: "off"}))
        for value in ("I-AUROC", "P-AUROC"):
            e = ablations.paired_effects(sub, "on", value).iloc[0]
            ctx.record(f"standardize/{task}/delta_{value}", e[f"Δ {value}"], f"(off − on) {value} on {task}, mean over seeds")
            ctx.record(f"standardize/{task}/within_noise_{value}", e["within seed noise"], f"is that Δ within seed noise")
    display(std_table)
"""),
    ]

    # ----------------------------------------------------------------------------------------- 08
    nbs["08_depth_and_first_task"] = [
        ("md", """
# 08 · Flow depth, training stability and the choice of the first task

Paper Sec. 4.3.4-4.3.5. **Depth**: the number of DCS blocks with the task-specific ACL blocks on and
off: accuracy, the loss curve of the first task, and the count of non-finite losses (steps skipped).
**First task**: the base is trained on task 0 only and frozen; five different categories as task 0,
each followed by the same tasks, show how much the final accuracy depends on that choice.
""" + budget),
        ("parameters", common_parameters + """DEPTHS = [2, 4, 6, 8]  # numbers of DCS blocks (QUICK: the first two)
FIRST_TASKS = ["coin", "carpet", "metal_mesh", "printed_text", "wood"]  # candidates for task 0 (object, texture, fine structure, ...)
"""),
        ("code", setup_cell("08_depth_and_first_task", "from decoflow_core import ablations\nfrom decoflow_core.experiments import load_metrics")),
        ("code", """
stream, changes = ablations.ablation_plan(ctx)
seed = ctx.seeds[0]
depths = DEPTHS[:2] if ctx.quick else DEPTHS
ctx.prefetch([("decoflow", seed, dict(stream=stream, n_dcs=d, use_acl=acl, **changes)) for d in depths for acl in (True, False)])
depth_runs = {(d, acl): load_metrics(ctx.run("decoflow", seed, stream=stream, n_dcs=d, use_acl=acl, **changes))
              for d in depths for acl in (True, False)}
depth_rows = pd.DataFrame([{"DCS blocks": d, "ACL": acl, **analysis.summary_row(m),
                            "non-finite steps": sum(h["nonfinite"] for h in m["history"].values()),
                            "final loss, task 0": m["history"][stream[0]]["loss"][-1],
                            "train s": sum(m["seconds"]["train"].values())}
                           for (d, acl), m in depth_runs.items()])
ctx.table(depth_rows, "08_depth")
for row in depth_rows.to_dict("records"):
    key = f"depth/{row['DCS blocks']}_{'acl' if row['ACL'] else 'noacl'}"
    ctx.record(f"{key}/I-AUROC", row["I-AUROC"], "mean I-AUROC at this depth")
    ctx.record(f"{key}/nonfinite", row["non-finite steps"], "training steps skipped for a non-finite loss")
depth_rows
"""),
        ("code", """
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), constrained_layout=True)
for (d, acl), m in depth_runs.items():
    loss = m["history"][stream[0]]["loss"]
    axes[0].plot(range(1, len(loss) + 1), loss, "-" if acl else "--", label=f"{d} DCS{' + ACL' if acl else ''}")
axes[0].xaxis.set_major_locator(plt.MaxNLocator(integer=True))
axes[0].set_xlabel("epoch")
axes[0].set_ylabel(f"training loss, task 0 ({stream[0]})")
axes[0].legend(fontsize=7)
for acl, style in ((True, "s-"), (False, "o--")):
    sub = depth_rows[depth_rows["ACL"] == acl]
    axes[1].plot(sub["DCS blocks"], sub["I-AUROC"], style, label="with ACL" if acl else "without ACL")
axes[1].set_xlabel("DCS blocks")
axes[1].set_ylabel("final mean I-AUROC")
axes[1].legend()
ctx.figure(fig, "08_depth")
"""),
        ("md", "## First-task sensitivity"),
        ("code", """
candidates, followers = ablations.first_task_plan(ctx.available, ctx.tasks, FIRST_TASKS, 2 if ctx.quick else 5)
print(f"task 0 candidates: {candidates}; followed by: {followers}")
ctx.prefetch([("decoflow", seed, dict(stream=[c] + followers, **changes)) for c in candidates])
first_rows = []
for c in candidates:
    m = load_metrics(ctx.run("decoflow", seed, stream=[c] + followers, **changes))
    first_rows.append({"task 0": c, "I-AUROC (all)": m["mean"]["image_auroc"],
                       "I-AUROC (followers)": float(np.mean([m["final"][t]["image_auroc"] for t in followers])),
                       "I-AUROC (task 0)": m["final"][c]["image_auroc"]})
first = pd.DataFrame(first_rows)
ctx.table(first, "08_first_task")
spread = float(first["I-AUROC (followers)"].max() - first["I-AUROC (followers)"].min())
ctx.record("first_task/followers_I-AUROC", first["I-AUROC (followers)"].tolist(), "mean I-AUROC on the fixed following tasks, per task-0 choice")
ctx.record("first_task/spread", spread, "max − min of that over the task-0 choices")
ctx.record("first_task/std", float(first["I-AUROC (followers)"].std(ddof=1)) if len(first) > 1 else None, "its std over the choices")
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar(first["task 0"], first["I-AUROC (followers)"], color="tab:blue")
ax.set_ylim(max(0, first["I-AUROC (followers)"].min() - 0.1), 1)
ax.set_ylabel(f"I-AUROC on {', '.join(followers)}")
ax.set_xlabel("category trained as task 0 (the base)")
ax.set_title(f"spread {spread:.3f}")
ctx.figure(fig, "08_first_task")
first
"""),
    ]

    # ----------------------------------------------------------------------------------------- 09
    nbs["09_why_nf_and_placement"] = [
        ("md", """
# 09 · Why a normalizing flow, and where to adapt

Paper Sec. 4.4.1-4.4.2. **Why NF**: the same decomposition (a shared base trained on task 0 and then
frozen, per-task LoRA adapters, the same router, features, protocol and tail-aware objective) applied
to a per-patch feature autoencoder (`ae_lora`), a variational autoencoder (`vae_lora`) and a
teacher–student pair (`ts_lora`, random-network distillation), against DeCoFlow's flow. **Where to
adapt**: DeCoFlow's adapters inside the coupling subnets against adaptation at the feature level,
a learned per-task offset (prompt) added to the input features of the frozen task-0 flow
(`feature_prompt`). The paper does not specify these variants; `decoflow_core/alternatives.py` says
exactly what the kit's are.
""" + budget),
        ("parameters", common_parameters),
        ("code", setup_cell("09_why_nf_and_placement", "from decoflow_core import ablations\nfrom decoflow_core.experiments import load_metrics")),
        ("code", """
stream, changes = ablations.ablation_plan(ctx)
MODELS = {"decoflow": "normalizing flow, adapters in the couplings", "ae_lora": "autoencoder + LoRA",
          "vae_lora": "VAE + LoRA", "ts_lora": "teacher-student + LoRA",
          "feature_prompt": "flow, per-task feature offset instead of adapters"}
ctx.prefetch([(method, seed, dict(stream=stream, **changes)) for method in MODELS for seed in ctx.seeds])
rows = pd.DataFrame([{"method": method, "seed": seed, **analysis.summary_row(load_metrics(ctx.run(method, seed, stream=stream, **changes)))}
                     for method in MODELS for seed in ctx.seeds])
table = analysis.seed_table(rows)
table.insert(1, "model", table["method"].map(MODELS))
ctx.table(table, "09_why_nf_and_placement")
for row in table.to_dict("records"):
    for key in ("I-AUROC", "P-AUROC", "P-AP", "FM (I-AUROC)", "params/task"):
        ctx.record(f"{row['method']}/{key}", row[key], f"{key} of {row['method']} ({row['model']}), mean over seeds")
table
"""),
        ("code", """
fig, axes = plt.subplots(1, 3, figsize=(12, 3.3), constrained_layout=True)
for ax, value in zip(axes, ("I-AUROC", "P-AUROC", "P-AP")):
    ax.bar(table["method"], table[value], color=["tab:green"] + ["tab:gray"] * (len(table) - 1))
    ax.set_title(value)
    ax.tick_params(axis="x", rotation=30)
ctx.figure(fig, "09_why_nf_and_placement")
"""),
    ]

    # ----------------------------------------------------------------------------------------- 10
    nbs["10_acl_analysis"] = [
        ("md", """
# 10 · What the task-specific ACL blocks do to the latent

Paper Sec. 4.4.5. The flow maps normal patches to a standard Gaussian. After the shared DCS blocks
(base + LoRA) the latent of a task is close to that but not quite; the task's ACL blocks finish the
job. Per task of the `decoflow` run of 02_sequential_training, on its training patches: mean |skewness|
and |excess kurtosis| over channels before and after ACL (0 and 0 for a Gaussian), and the R² of the
best affine map from the latent before ACL to the latent after it (1 = ACL is linear).
"""),
        ("parameters", common_parameters + "N_IMAGES = 48  # training images per task whose patches are analysed\n"),
        ("code", setup_cell("10_acl_analysis", "from decoflow_core import ablations\nfrom decoflow_core.report import load_run")),
        ("code", """
config, extractor, learner, device = load_run(ctx.run("decoflow"))
features = ctx.features()
rows, latents = [], {}
for task in ctx.tasks:
    before, after = latents[task] = ablations.acl_latents(learner.model, task, features[task].train["patch"][:N_IMAGES].to(device))
    rows.append({"task": task, **{f"{k} before": v for k, v in ablations.moments(before).items()},
                 **{f"{k} after": v for k, v in ablations.moments(after).items()},
                 "R² affine fit": ablations.linear_fit_r2(before, after),
                 "mean |z|² / D before": float((before ** 2).sum(1).mean() / before.shape[1]),
                 "mean |z|² / D after": float((after ** 2).sum(1).mean() / after.shape[1])})
acl = pd.DataFrame(rows)
ctx.table(acl, "10_acl_moments")
for column in acl.columns[1:]:
    ctx.record(f"mean/{column}", float(acl[column].mean()), f"{column}, mean over tasks")
ctx.record("n_acl", config.n_acl if config.use_acl else 0, "ACL blocks per task in the run")
acl
"""),
        ("code", """
fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), constrained_layout=True)
x = np.arange(len(acl))
for ax, name in zip(axes[:2], ("abs_skewness", "abs_excess_kurtosis")):
    ax.bar(x - 0.2, acl[f"{name} before"], 0.4, label="before ACL")
    ax.bar(x + 0.2, acl[f"{name} after"], 0.4, label="after ACL")
    ax.set_xticks(x, acl["task"], rotation=60, fontsize=7)
    ax.set_title(name.replace("_", " "))
    ax.legend(fontsize=7)
task = ctx.tasks[0]
before, after = latents[task]
grid = np.linspace(-5, 5, 200)
for data, label in ((before[:, 0], "before ACL"), (after[:, 0], "after ACL")):
    axes[2].hist(data, bins=80, range=(-5, 5), density=True, histtype="step", label=label)
axes[2].plot(grid, np.exp(-grid ** 2 / 2) / np.sqrt(2 * np.pi), "k:", label="N(0, 1)")
axes[2].set_title(f"{task}: channel 0 of the latent")
axes[2].legend(fontsize=7)
ctx.figure(fig, "10_acl_latent")
"""),
    ]

    # ----------------------------------------------------------------------------------------- 11
    nbs["11_computational_cost"] = [
        ("md", """
# 11 · Computational cost as tasks accumulate

Paper Sec. 4.4.7. For `decoflow`, `independent` (a whole flow per task) and `replay` (one flow and a
buffer of stored features): parameters (base, per task, percent), the router's stored statistics,
training time per task, inference latency per image split into backbone / router / flow, peak memory,
and the stored model size as the number of tasks grows. Runs are those of 02_sequential_training;
their training times were measured in parallel worker processes of one thread each. Latency is
measured here, one image at a time, with this notebook's threads.
"""),
        ("parameters", common_parameters + "LATENCY_IMAGES = 16  # test images timed per method\n"),
        ("code", setup_cell("11_computational_cost", "import resource\nfrom decoflow_core import ablations\nfrom decoflow_core.experiments import load_metrics\nfrom decoflow_core.features import load_batch\nfrom decoflow_core.report import load_run")),
        ("code", """
METHODS = ["decoflow", "independent", "replay"]
category = ctx.features()[ctx.tasks[0]].category
images = load_batch([s.path for s in category.test[:LATENCY_IMAGES]], ctx.config().image_size)
rows, curves = [], {}
for method in METHODS:
    run = ctx.run(method)
    m = load_metrics(run)
    config, extractor, learner, device = load_run(run)
    router_bytes = learner.router.memory_bytes() / len(m["tasks"]) if learner.uses_router else 0
    grid_floats = extractor.dim * config.grid ** 2
    replay_floats = config.replay_per_task * grid_floats if method == "replay" else 0
    curves[method] = ablations.model_size_curve(method, m["params"], len(m["tasks"]), router_floats_per_task=router_bytes / 4,
                                                replay_floats_per_task=replay_floats) * 4 / 2 ** 20
    rows.append({"method": method, "base params": m["params"]["base"], "params per task": m["params"]["per_task"],
                 "per task / base %": 100 * m["params"]["per_task_ratio"] if m["params"]["base"] else None,
                 "router KiB per task": router_bytes / 1024, "replay KiB per task": replay_floats * 4 / 1024,
                 "train s per task": float(np.mean(list(m["seconds"]["train"].values()))),
                 **ablations.latency(extractor.to(device), learner, images.to(device)),
                 f"MiB after {len(m['tasks'])} tasks": float(curves[method][-1])})
cost = pd.DataFrame(rows)
cost["peak RSS MiB (this kernel)"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
ctx.table(cost, "11_cost")
for row in cost.to_dict("records"):
    for key in ("params per task", "router KiB per task", "train s per task", "backbone ms", "router ms", "flow ms"):
        ctx.record(f"{row['method']}/{key}", row[key], f"{key}, {row['method']}")
    ctx.record(f"{row['method']}/size_curve_mib", [float(v) for v in curves[row["method"]]], "stored MiB after 1..T tasks")
cost
"""),
        ("code", """
fig, ax = plt.subplots(figsize=(6, 3.5))
for method, curve in curves.items():
    ax.plot(range(1, len(curve) + 1), curve, marker="o", label=method)
ax.set_xlabel("tasks learned")
ax.set_ylabel("stored model size (MiB, float32)")
ax.legend()
ctx.figure(fig, "11_model_size")
"""),
    ]
    return nbs
