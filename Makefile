# The two commands of the README. Each creates .venv/ and installs what it needs itself.
#   make demo   the main job: builds the 64 and 256 px emoji datasets, trains the 64x64
#               base and the 64->256 stage for 3 minutes each (CPU demo configs), leaving
#               checkpoints, TensorBoard logs and sample grids; plus the analytic testbed
#   make test   the test suite (what CI runs, through .ci/run)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo
# TFDS data directory for the demo's datasets (built once, then reused).
DATA_DIR ?= $(CURDIR)/data/tfds

.PHONY: demo test install clean-venv

install: $(STAMP)

# Reinstalls when the pins change. `pip install -e .` makes `imagen_jax` importable from
# anywhere (scripts, benchmarks, subprocess tests).
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

demo: $(STAMP)
	$(PY) launch.py --config=configs/base64.py:demo --workdir=$(DEMO_DIR)/data64 \
	    --mode=build_data --config.data.data_dir=$(DATA_DIR)
	$(PY) launch.py --config=configs/sr256.py:demo --workdir=$(DEMO_DIR)/data256 \
	    --mode=build_data --config.data.data_dir=$(DATA_DIR)
	$(PY) launch.py --config=configs/base64.py:demo --workdir=$(DEMO_DIR)/base64 \
	    --mode=train --config.data.data_dir=$(DATA_DIR)
	$(PY) launch.py --config=configs/sr256.py:demo --workdir=$(DEMO_DIR)/sr256 \
	    --mode=train --config.data.data_dir=$(DATA_DIR)
	$(PY) launch.py --config=configs/gmm.py:ring --workdir=$(DEMO_DIR)/gmm_ring --mode=sample
	@echo "demo outputs in $(DEMO_DIR)/: base64/ and sr256/ hold checkpoints/, tensorboard/" \
	    "(event files), samples/*.png (EMA sample grids), loss.png and metrics.jsonl"

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 tests

clean-venv:
	rm -rf $(VENV)
