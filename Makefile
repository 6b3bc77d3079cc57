# lance: the two commands a newcomer needs are `make figures` and `make test`.
# Both create the virtual environment .venv on first use (pip, no conda needed).

PYTHON ?= python3
PROFILE ?= smoke
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Keep Jupyter's and IPython's state inside the project, never in the user's home.
export JUPYTER_RUNTIME_DIR := $(CURDIR)/build/jupyter-runtime
export IPYTHONDIR := $(CURDIR)/$(VENV)/ipython
export MPLBACKEND := Agg

NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
EXECUTED := $(patsubst notebooks/%.ipynb,build/$(PROFILE)/%.ipynb,$(NOTEBOOKS))
LIBRARY := $(wildcard lance_lib/*.py lance_lib/*/*.py lance_lib/resources/*.csv)
FORCE_FLAG := $(if $(FORCE),--force,)
# FORCE=1 also makes every executed notebook out of date (a phony prerequisite), so make
# really calls the runner for each one instead of skipping the up-to-date ones.
FORCE_RERUN := $(if $(FORCE),force-rerun,)

.PHONY: all venv test figures grid lab bench weights lint format clean force-rerun
all: test

# Idempotent set-up: re-installs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name lance --display-name "Python (lance)" >/dev/null
	touch $(STAMP)

venv: $(STAMP)

# Every core (pytest-xdist, TEST_WORKERS=auto: one worker per core, one torch thread
# each); each test file runs on one worker (--dist loadfile in pyproject.toml), so the
# notebooks are executed once while the others take the rest. TEST_WORKERS=0: one process.
TEST_WORKERS ?= auto
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS)

# DOWNLOAD=1: before any notebook, torchvision downloads the profile's missing datasets
# it can into the data root ($$LANCE_DATA, default data/); the others (miniImageNet,
# notMNIST, CUB-200, ...) are named with their files and sources, and make stops.
# `make data-plan` prints what it would do, downloading nothing.
DATA_STEP := $(if $(DOWNLOAD),data,)
.PHONY: data data-plan
data: $(STAMP)
	$(PY) -m lance_lib.experiments.data_plan --profile $(PROFILE) --download

data-plan: $(STAMP)
	$(PY) -m lance_lib.experiments.data_plan --profile $(PROFILE)

# One executed notebook per source notebook; re-runs only when the notebook, the
# profile or the library changed (or FORCE=1).  Safe under make -j.
# The runner skips a notebook whose fingerprint (cells, parameters, inputs, library) is
# unchanged, and writes build/$(PROFILE)/<name>.d listing the extra inputs it declares.
build/$(PROFILE)/%.ipynb: notebooks/%.ipynb profiles/$(PROFILE).yaml $(LIBRARY) $(STAMP) $(FORCE_RERUN) | $(DATA_STEP)
	$(PY) -m lance_lib.notebook_runner $< $@ --profile $(PROFILE) $(FORCE_FLAG)

-include $(wildcard build/$(PROFILE)/*.d)

# The claims scorecard reads the other notebooks' records: it runs after all of them.
build/$(PROFILE)/99_claims_scorecard.ipynb: $(filter-out build/$(PROFILE)/99_claims_scorecard.ipynb,$(EXECUTED))

# The reference profile's executed notebooks are published beside its figures
# (figures/reference/notebooks/), so a reader sees every figure and table without a kernel.
PUBLISHED := $(if $(filter reference,$(PROFILE)),$(patsubst build/reference/%,figures/reference/notebooks/%,$(EXECUTED)),)
figures/reference/notebooks/%.ipynb: build/reference/%.ipynb
	@mkdir -p $(@D)
	cp $< $@

figures: $(STAMP) $(EXECUTED) $(PUBLISHED)
	@echo "figures/ is up to date for profile $(PROFILE)"

# Compute every experiment of the profile before the notebooks plot them: in-process by
# default; WORKERS=n: a local Dask cluster of n processes (one GPU each where GPUs exist);
# SCHEDULER=tcp://host:port: a running Dask cluster; THREADS=t torch threads per task.
grid: $(STAMP)
	$(PY) -m lance_lib.experiments.grid --profile $(PROFILE) $(if $(WORKERS),--workers $(WORKERS),) $(if $(SCHEDULER),--scheduler $(SCHEDULER),) $(if $(THREADS),--threads $(THREADS),)

# JupyterLab serving the repository root (README, figures/ and its gallery one click
# away), opened on notebooks/, with the project's kernel and matplotlib's inline backend
# (the Agg exported above would draw nothing in a notebook); --allow-root is added when
# run as root. The project's Lab settings (.jupyter/lab/settings/overrides.json) turn
# off the news pop-up. In a container: make lab LAB_ARGS="--ip=0.0.0.0 --no-browser",
# then open the http://127.0.0.1:8888/lab?token=... URL it prints (with the container's
# published port). LAB_ROOT: another folder to serve (it must hold notebooks/).
LAB_ROOT ?= .
LAB_ARGS ?=
lab: $(STAMP)
	MPLBACKEND=module://matplotlib_inline.backend_inline $(VENV)/bin/jupyter lab \
		$(if $(filter 0,$(shell id -u)),--allow-root,) --ServerApp.root_dir=$(LAB_ROOT) \
		--LabApp.default_url=/lab/tree/notebooks \
		--LabApp.app_settings_dir=$(CURDIR)/.jupyter/lab/settings $(LAB_ARGS)

# The browser check: `make lab` in Debian's chromium (apt-get install chromium) runs the
# teaching notebook and reads the page (tests/test_lab.py; skipped, with the reason, where
# chromium or playwright is missing). Findings and screenshots: build/check-lab/.
.PHONY: check-lab
$(VENV)/.browser-installed: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,browser]"
	touch $@

check-lab: $(VENV)/.browser-installed
	LANCE_CHECK_LAB=1 $(PY) -m pytest -rs -s tests/test_lab.py

force-rerun:

# Every benchmark section (python -m bench --help lists them) into bench/latest.json.
bench: $(STAMP)
	$(PY) -m bench --out bench/latest.json

# The reference backbones under data/weights/ (hours on a CPU; resumable): CIFAR-10 is
# read from the data root, $$LANCE_DATA (default: the repository's data/).
weights: $(STAMP)
	$(PY) -m lance_lib.weights build resnet18 mcunet

lint: $(STAMP)
	$(VENV)/bin/ruff check lance_lib tests bench
	$(VENV)/bin/ruff format --check lance_lib tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format lance_lib tests bench

clean:
	rm -rf build
