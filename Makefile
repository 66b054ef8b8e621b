# The two commands of the README. Each creates .venv/ and installs what it needs itself.
#   make demo   the main job: builds the emoji datasets (64 and 256 px whole, a 1024 px
#               subset), trains the 64x64 base, the 64->256 and the 256->1024 stages for a
#               few minutes each (CPU demo configs), then evaluates the cascade: samples
#               from text at 64/256/1024, FID and the offline alignment score over a
#               guidance sweep, and a report (runs/demo/eval/report.md); last, it samples
#               the 32 px base stage the repo ships (assets/emoji32_base.npz, trained
#               for ~2 CPU hours by the noise-schedule study's recipe; assets/README.md)
#               from eight prompts, to show what longer training reaches
#   make test   the test suite (what CI runs, through .ci/run)
#   make install ACCEL=gpu|tpu   .venv/ for NVIDIA GPUs (CUDA 12) or Cloud TPU VMs: the CPU
#               install plus requirements-gpu.txt / requirements-tpu.txt (demo and test
#               ignore ACCEL)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo
# TFDS data directory for the demo's datasets (built once, then reused).
DATA_DIR ?= $(CURDIR)/data/tfds
# Accelerator for `make install`: empty (CPU), gpu or tpu.
ACCEL ?=
ifneq ($(filter-out gpu tpu,$(ACCEL)),)
$(error ACCEL=$(ACCEL): use ACCEL=gpu (NVIDIA, CUDA 12) or ACCEL=tpu (Cloud TPU VM), or leave it unset for CPU)
endif

.PHONY: demo test install clean-venv

install: $(STAMP) $(if $(ACCEL),$(VENV)/.installed-$(ACCEL))

# Reinstalls when the pins change. `pip install -e .` makes `imagen_jax` importable from
# anywhere (scripts, benchmarks, subprocess tests).
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# The accelerator's jax plugins on top (their files keep jax at requirements.txt's pin);
# redone after the CPU install reran, since that may have changed jax.
$(VENV)/.installed-gpu $(VENV)/.installed-tpu: $(VENV)/.installed-%: requirements-%.txt $(STAMP)
	$(PY) -m pip install --quiet -r $<
	touch $@

demo: $(STAMP)
	$(PY) launch.py --config=configs/base64.py:demo --workdir=$(DEMO_DIR)/data64 \
	    --mode=build_data --config.data.data_dir=$(DATA_DIR)
	$(PY) launch.py --config=configs/sr256.py:demo --workdir=$(DEMO_DIR)/data256 \
	    --mode=build_data --config.data.data_dir=$(DATA_DIR)
	$(PY) launch.py --config=configs/sr1024.py:demo --workdir=$(DEMO_DIR)/data1024 \
	    --mode=build_data --config.data.data_dir=$(DATA_DIR)
	$(PY) launch.py --config=configs/base64.py:demo --workdir=$(DEMO_DIR)/base64 \
	    --mode=train --config.data.data_dir=$(DATA_DIR)
	$(PY) launch.py --config=configs/sr256.py:demo --workdir=$(DEMO_DIR)/sr256 \
	    --mode=train --config.data.data_dir=$(DATA_DIR)
	$(PY) launch.py --config=configs/sr1024.py:demo --workdir=$(DEMO_DIR)/sr1024 \
	    --mode=train --config.data.data_dir=$(DATA_DIR)
	$(PY) launch.py --config=configs/cascade.py:demo --workdir=$(DEMO_DIR)/eval --mode=eval \
	    --config.stages="('$(DEMO_DIR)/base64', '$(DEMO_DIR)/sr256', '$(DEMO_DIR)/sr1024')"
	$(PY) launch.py --config=configs/cascade.py:shipped --workdir=$(DEMO_DIR)/shipped \
	    --mode=sample
	@echo "demo outputs in $(DEMO_DIR)/: base64/, sr256/ and sr1024/ hold checkpoints/," \
	    "tensorboard/ (event files), samples/*.png (EMA sample grids), loss.png and" \
	    "metrics.jsonl; eval/ holds the cascade's samples, results.csv/.md, the" \
	    "FID-vs-alignment plot and the report: $(DEMO_DIR)/eval/report.md;" \
	    "shipped/grid_32px.png: the shipped base stage's samples (assets/README.md)"

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 tests

clean-venv:
	rm -rf $(VENV)
