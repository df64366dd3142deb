# DeCoFlow reproduction kit.  `make test` and `make reproduce` set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

DATA    ?= embedded
PROFILE ?= cpu
SEEDS   ?= 0
QUICK   ?= 0

.PHONY: setup test reproduce embedded clean-runs

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

clean-runs:
	rm -rf runs
