# DeCoFlow reproduction kit.  `make test` and `make reproduce` set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

DATA    ?= embedded
PROFILE ?= cpu
SEEDS   ?= 0
QUICK   ?= 0
SETS    ?=
EXECUTOR ?= local
RAY_ADDRESS ?=
# an MVTec-layout tree holding `bottle` and `magnetic_tile` (not shipped): make real-ad REAL_AD=/path
REAL_AD ?=
# an MVTec-layout tree of look-alike categories for notebook 06's router comparison (not shipped)
SIMILAR ?=
TASK_LRS = task_lr=1e-3,3e-3,1e-2,3e-2

.PHONY: setup test reproduce select select-router real-ad embedded clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[notebooks,tests]'
	# notebooks are committed without outputs: git strips them on `git add` (.gitattributes names the filter)
	if git rev-parse --git-dir > /dev/null 2>&1; then $(VENV)/bin/nbstripout --install --attributes .gitattributes; fi
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

embedded: $(STAMP)
	$(PY) -m decoflow_core prepare embedded --out data/embedded

# PROFILE=official QUICK=1 SETS=backbone=efficientnet_lite0: the official model, offline, in minutes
# EXECUTOR=ray [RAY_ADDRESS=host:6379]: missing runs as Ray tasks (docs/cluster.md)
reproduce: $(STAMP)
	$(PY) -m decoflow_core.analysis.pipeline --data $(DATA) --profile $(PROFILE) --seeds $(SEEDS) --quick $(QUICK) \
	  $(foreach pair,$(SETS),--set $(pair)) $(if $(REAL_AD),--real-data $(REAL_AD)) $(if $(SIMILAR),--similar-data $(SIMILAR)) \
	  --executor $(EXECUTOR) $(if $(RAY_ADDRESS),--ray-address $(RAY_ADDRESS))

# The cpu profile's choices (docs/selection.md), on held-out train/good (10%), one after the other:
# standardize and pe_scale by the AUROC against synthetic defects, task_lr and epochs by validation NLL
# (these four at 8 epochs), the independent baseline's lr at the final profile, then the official
# code's recipe (NLL) and feature aggregation (synthetic AUROC). Each on the embedded stream and, with
# REAL_AD, on bottle -> magnetic_tile (~80 min).
SELECT = $(PY) -m decoflow_core select --out runs/selection
REAL_TASKS = --data $(REAL_AD) --tasks bottle,magnetic_tile
RECIPE = weight_decay=0.01,grad_clip=0.5,lr_schedule=cosine,warmup_epochs=2,lambda_logdet=1e-4,tail_scope=image,drop_last=true
SELECTIONS = "--grid standardize=true,false --criterion synthetic --set epochs=8" \
             "--grid $(TASK_LRS) --set epochs=8" \
             "--grid pe_scale=1,3,10 --criterion synthetic --set epochs=8" "--grid epochs=8,12,16" \
             "--candidate current: --candidate recipe:$(RECIPE)" \
             "--candidate current: --candidate unfold28:aggregation=unfold,grid=28 --criterion synthetic"
select: $(STAMP)
	for step in $(SELECTIONS); do \
	  $(SELECT) $$step || exit 1; \
	  if [ -n "$(REAL_AD)" ]; then $(SELECT) $(REAL_TASKS) $$step || exit 1; fi; \
	done
	$(SELECT) --method independent --grid independent_lr=1e-3,3e-3
	cp runs/selection/embedded/selection-independent-independent_lr.csv results/selection_independent_lr_embedded.csv
	for what in standardize task_lr pe_scale epochs current-recipe current-unfold28; do \
	  cp runs/selection/embedded/selection-decoflow-$$what.csv results/selection_$${what}_embedded.csv || exit 1; \
	  if [ -n "$(REAL_AD)" ]; then \
	    cp runs/selection/$$(basename $(REAL_AD))/selection-decoflow-$$what.csv results/selection_$${what}_real_ad.csv || exit 1; \
	  fi; \
	done

# The default router's choice (docs/selection.md): per stream a decoflow run with 20% of every category's
# train/good held out, then every candidate router's accuracy on those images (the flows and prototypes
# never saw them) -> results/selection_router_<stream>.csv; REAL_AD and SIMILAR join when given (~15 min)
select-router: $(STAMP)
	for data in embedded boards $(REAL_AD) $(SIMILAR); do \
	  name=$$(basename $$data); \
	  $(PY) -m decoflow_core run --data $$data --set val_fraction=0.2 --set num_threads=1 --resume --out runs/selection/router-$$name > /dev/null || exit 1; \
	  $(PY) -m decoflow_core.analysis.routing runs/selection/router-$$name --data $$data --out results/selection_router_$$name.csv || exit 1; \
	done

# The real-data check (docs/real_data.md): decoflow over 3 seeds, the same with the paper's per-patch
# standardization (standardize=true), independent and the PaDiM-style reference on bottle ->
# magnetic_tile; the table goes to results/real_ad.md, the border/position analysis to
# results/real_ad_analysis.md (~9 min)
REAL_RUN = $(PY) -m decoflow_core run $(REAL_TASKS) --resume
real-ad: $(STAMP)
	@test -n "$(REAL_AD)" || { echo "make real-ad needs REAL_AD=/path/to/an MVTec-layout tree with bottle and magnetic_tile"; exit 2; }
	for seed in 0 1 2; do \
	  $(REAL_RUN) --seed $$seed --out runs/real_ad/decoflow-s$$seed > /dev/null && \
	  $(REAL_RUN) --seed $$seed --set standardize=true --out runs/real_ad/decoflow-std-s$$seed > /dev/null || exit 1; \
	done
	for method in independent padim; do \
	  $(REAL_RUN) --method $$method --out runs/real_ad/$$method-s0 > /dev/null || exit 1; \
	done
	$(PY) -m decoflow_core report --per-task runs/real_ad/decoflow-s? runs/real_ad/decoflow-std-s? \
	  runs/real_ad/independent-s0 runs/real_ad/padim-s0 > results/real_ad.md
	$(PY) scripts/real_ad_analysis.py runs/real_ad/decoflow-s0 runs/real_ad/decoflow-std-s0 \
	  runs/real_ad/independent-s0 > results/real_ad_analysis.md
	cat results/real_ad.md results/real_ad_analysis.md

clean-runs:
	rm -rf runs
