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

.PHONY: all venv test figures lab bench lint format clean
all: test

# Idempotent set-up: re-installs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name lance --display-name "Python (lance)" >/dev/null
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# One executed notebook per source notebook; re-runs only when the notebook, the
# profile or the library changed (or FORCE=1).  Safe under make -j.
# The runner skips a notebook whose fingerprint (cells, parameters, inputs, library) is
# unchanged, and writes build/$(PROFILE)/<name>.d listing the extra inputs it declares.
build/$(PROFILE)/%.ipynb: notebooks/%.ipynb profiles/$(PROFILE).yaml $(LIBRARY) $(STAMP)
	$(PY) -m lance_lib.notebook_runner $< $@ --profile $(PROFILE) $(FORCE_FLAG)

-include $(wildcard build/$(PROFILE)/*.d)

figures: $(STAMP) $(EXECUTED)
	@echo "figures/ is up to date for profile $(PROFILE)"

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

bench: $(STAMP)
	$(PY) bench/run.py --out bench/latest.json

lint: $(STAMP)
	$(VENV)/bin/ruff check lance_lib tests bench
	$(VENV)/bin/ruff format --check lance_lib tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format lance_lib tests bench

clean:
	rm -rf build
