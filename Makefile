# DeCoFlow reproduction kit.  `make test` and `make reproduce` set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

DATA    ?= embedded
PROFILE ?= cpu
SEEDS   ?= 0
QUICK   ?= 0
REAL_AD ?= ../shared/data/real_ad
TASK_LRS = task_lr=1e-3,3e-3,1e-2,3e-2

.PHONY: setup test reproduce select real-ad embedded clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[notebooks,tests]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

embedded: $(STAMP)
	$(PY) -m decoflow_core prepare embedded --out data/embedded

reproduce: $(STAMP)
	$(PY) -m decoflow_core.pipeline --data $(DATA) --profile $(PROFILE) --seeds $(SEEDS) --quick $(QUICK)

# the cpu profile's choices on held-out train/good (10%), never on test data: standardize by the AUROC
# against synthetic defects, then task_lr by validation NLL; and the check of independent's lr (~20 min)
SELECT = $(PY) -m decoflow_core select --out runs/selection
REAL_TASKS = --data $(REAL_AD) --tasks bottle,magnetic_tile
select: $(STAMP)
	$(SELECT) --grid standardize=true,false --criterion synthetic
	$(SELECT) --grid $(TASK_LRS)
	$(SELECT) --method independent --grid independent_lr=1e-3,3e-3
	cp runs/selection/embedded/selection-decoflow-standardize.csv results/selection_standardize_embedded.csv
	cp runs/selection/embedded/selection-decoflow-task_lr.csv results/selection_task_lr_embedded.csv
	cp runs/selection/embedded/selection-independent-independent_lr.csv results/selection_independent_lr_embedded.csv
	if [ -d $(REAL_AD) ]; then \
	  $(SELECT) $(REAL_TASKS) --grid standardize=true,false --criterion synthetic && \
	  $(SELECT) $(REAL_TASKS) --grid $(TASK_LRS) && \
	  for what in standardize task_lr; do \
	    cp runs/selection/$$(basename $(REAL_AD))/selection-decoflow-$$what.csv results/selection_$${what}_real_ad.csv || exit 1; \
	  done; \
	fi

# issue 4's real-data check: decoflow over 3 seeds, the same with the paper's per-patch standardization
# (standardize=true), independent and the PaDiM-style reference on bottle -> magnetic_tile; the table
# goes to results/real_ad.md, the border/position analysis to results/real_ad_analysis.md (~8 min)
REAL_RUN = $(PY) -m decoflow_core run $(REAL_TASKS) --resume
real-ad: $(STAMP)
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
