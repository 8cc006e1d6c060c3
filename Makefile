# relvid: `make help` lists the targets. Variables: REL (relation or alias), CACHE (clip cache
# folder), MOCHI_PATH (local diffusers-format Mochi folder), OUT (run folder), ARGS (extra
# key=value overrides), PYTHON (interpreter used to create .venv), NTU_ROOT / VIDEOS / T5_PATH
# (preprocessing), PROMPT / SEEDS / ADAPTERS (sampling), STRATEGY (ddp, fsdp, deepspeed_stage_2/3).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RELVID := $(VENV)/bin/relvid
TORCH_VERSION := 2.13.0
REL ?= shaking_hands
ARGS ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: setup.cfg setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	# torch first and pinned, so nothing resolves a different (multi-GB) build
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	# the tested set: setup.cfg's ranges, held at the versions constraints.txt names (docs/install.md)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[video,deepspeed,test,wandb]'
	touch $@

install: $(VENV)/.installed ## create .venv and install relvid with all its dependencies

test: $(VENV)/.installed ## run the test suite (CPU; slow and GPU tests excluded)
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

lint: $(VENV)/.installed ## check the code with ruff (rules E, F, I, B, UP, W; ruff.toml), as CI does
	$(VENV)/bin/ruff check .

test-all: $(VENV)/.installed ## run every test, slow ones included (GPU tests skip without a GPU)
	$(PY) -m pytest -q $(PYTEST_ARGS)

train: $(VENV)/.installed ## train a relation: make train REL=handshake CACHE=<cache dir> MOCHI_PATH=<mochi dir>
	$(RELVID) train configs/train.yaml --relation $(REL) --configs-dir configs \
		$(if $(CACHE),data.cache_dir=$(CACHE)) $(if $(MOCHI_PATH),model.path=$(MOCHI_PATH)) \
		$(if $(OUT),output_dir=$(OUT)) $(if $(STRATEGY),configs/strategy/$(STRATEGY).yaml) $(ARGS)

resume: $(VENV)/.installed ## resume the last checkpoint of a run: make resume REL=handshake [OUT=...]
	$(MAKE) train REL=$(REL) ARGS="resume=last $(ARGS)"

smoke: $(VENV)/.installed ## train the tiny random model for a few CPU steps on a random cache
	$(RELVID) random-cache outputs/smoke/cache --relation $(REL) --overwrite
	$(RELVID) train configs/tiny.yaml --relation $(REL) data.cache_dir=outputs/smoke/cache \
		output_dir=outputs/smoke/run-$$(date +%Y%m%d-%H%M%S) $(ARGS)

export: $(VENV)/.installed ## export a run's adapters to a LoRA file: make export REL=handshake [FORMAT=diffusers|mochi] [OUT=...]
	$(RELVID) export $(or $(OUT),outputs/$$($(RELVID) relations --resolve $(REL)))/adapters --format $(or $(FORMAT),diffusers) \
		--out $(or $(OUT),outputs/$$($(RELVID) relations --resolve $(REL)))/$(or $(FORMAT),diffusers)_lora --triplet

demo: $(VENV)/.installed ## the toy world end to end on the CPU: customize, sample, judge, print the table (outputs/demo)
	$(RELVID) demo $(if $(OUT),--out $(OUT)) $(ARGS)

toy-base: $(VENV)/.installed ## pretrain the toy world's base model (GPU if present) into relvid/toy/base_model
	$(RELVID) toy-base $(ARGS)

preprocess: $(VENV)/.installed ## videos -> clip cache: make preprocess REL=handshake NTU_ROOT=... MOCHI_PATH=... [T5_PATH=...]
	$(RELVID) preprocess --relation $(REL) $(if $(NTU_ROOT),--ntu-root $(NTU_ROOT)) $(if $(VIDEOS),--videos $(VIDEOS)) \
		$(if $(MOCHI_PATH),--mochi-path $(MOCHI_PATH)) $(if $(T5_PATH),--t5-path $(T5_PATH)) $(if $(CACHE),--out $(CACHE)) $(ARGS)

mask-sheet: $(VENV)/.installed ## contact sheet of a cached clip: make mask-sheet REL=handshake [CACHE=...] ARGS="--clip ID --mp4"
	$(RELVID) mask-sheet $(or $(CACHE),data/cache/$$($(RELVID) relations --resolve $(REL))) $(ARGS)

sample: $(VENV)/.installed ## sample with a relation: make sample REL=handshake PROMPT="A dog is shaking hands with a cat." [ADAPTERS=...] [SEEDS="0 1"] MOCHI_PATH=...
	$(RELVID) sample --relation $(REL) $(if $(PROMPT),--prompt "$(PROMPT)") $(if $(SEEDS),--seeds $(SEEDS)) \
		$(if $(MOCHI_PATH),--mochi-path $(MOCHI_PATH)) $(if $(ADAPTERS),--adapters $(ADAPTERS)) $(if $(OUT),--out $(OUT)) $(ARGS)

evaluate: $(VENV)/.installed ## test videos + RelAcc/CLIP-T/TempCons/FVD table: make evaluate REL=handshake MOCHI_PATH=... ARGS="--judge api --judge-url ... --judge-model ... --clip-path ..."
	$(RELVID) evaluate --relation $(REL) $(if $(MOCHI_PATH),--mochi-path $(MOCHI_PATH)) \
		$(if $(ADAPTERS),--adapters $(ADAPTERS)) $(if $(OUT),--out $(OUT)) $(ARGS)

analyze: $(VENV)/.installed ## the paper's analyses: make analyze KIND=attention MODEL=relvid/toy/base_model ARGS='--prompt "..." --phrase ...' [ADAPTERS=...] [OUT=...]
	$(RELVID) analyze $(KIND) $(if $(MODEL),--model $(MODEL),$(if $(MOCHI_PATH),--model $(MOCHI_PATH))) \
		$(if $(ADAPTERS),--adapters $(ADAPTERS)) $(if $(OUT),--out $(OUT)) $(ARGS)

bench: $(VENV)/.installed ## benchmark training step + CFG sample on one GPU (full-size Mochi, random weights)
	$(PY) experiments/bench/bench.py $(ARGS)

bench-tiny: $(VENV)/.installed ## the benchmark with the tiny model on the CPU (seconds)
	$(PY) experiments/bench/bench.py --tiny $(ARGS)

# PY=<interpreter> on the command line: that interpreter as it is (relvid importable from this folder), no .venv
GPU_CHECK_DEPS := $(if $(filter command line,$(origin PY)),,$(VENV)/.installed)
gpu-check: $(GPU_CHECK_DEPS) ## self-test on a CUDA machine, tables in outputs/gpu-check: make gpu-check [PY=python3] [ARGS="--stage 1"]
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(PY) experiments/bench/gpu_check.py $(if $(OUT),--out $(OUT)) $(ARGS)

WHEELS ?= wheels
WHEEL_PYTHON ?= 3.11
# the target's glibc (2.28: RHEL/Rocky 8, Ubuntu 20.04 and later) and every older manylinux tag it runs
WHEEL_PLATFORMS ?= $(foreach v,28 27 26 25 24 23 22 21 20 19 18 17,manylinux_2_$(v)_x86_64) manylinux2014_x86_64
wheels: ## relvid and every dependency as wheels for an offline Linux GPU machine: make wheels WHEELS=dir [WHEEL_PYTHON=3.11]
	mkdir -p $(WHEELS)
	$(PYTHON) -m pip wheel --quiet --no-deps --wheel-dir $(WHEELS) .
	$(PYTHON) -m pip download --dest $(WHEELS) --find-links $(WHEELS) --only-binary=:all: \
		$(foreach p,$(WHEEL_PLATFORMS),--platform $(p)) --python-version $(WHEEL_PYTHON) -c constraints.txt \
		'relvid[video]==$(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' relvid/__init__.py)' 'torch==$(TORCH_VERSION)' pytest
	@echo "wheels for Python $(WHEEL_PYTHON) on $(firstword $(WHEEL_PLATFORMS)) in $(WHEELS)/ (docs/gpu.md: installing offline)"

tensorboard: $(VENV)/.installed ## serve the TensorBoard logs of all runs under outputs/
	$(VENV)/bin/tensorboard --logdir outputs

clean: ## remove caches and build files (keeps .venv and outputs/)
	rm -rf .pytest_cache build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +

.PHONY: help install test lint test-all train resume smoke export demo toy-base preprocess mask-sheet sample evaluate analyze bench bench-tiny gpu-check wheels tensorboard clean
