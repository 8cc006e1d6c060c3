# relvid: `make help` lists the targets. Variables: REL (relation or alias), CACHE (clip cache
# folder), MOCHI_PATH (local diffusers-format Mochi folder), OUT (run folder), ARGS (extra
# key=value overrides), PYTHON (interpreter used to create .venv).
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

$(VENV)/.installed: setup.cfg setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	# torch first and pinned, so nothing resolves a different (multi-GB) build
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[video,deepspeed,test]'
	touch $@

install: $(VENV)/.installed ## create .venv and install relvid with all its dependencies

test: $(VENV)/.installed ## run the test suite (CPU; slow and GPU tests excluded)
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: $(VENV)/.installed ## run every test, slow ones included (GPU tests skip without a GPU)
	$(PY) -m pytest -q $(PYTEST_ARGS)

train: $(VENV)/.installed ## train a relation: make train REL=handshake CACHE=<cache dir> MOCHI_PATH=<mochi dir>
	$(RELVID) train configs/train.yaml --relation $(REL) \
		$(if $(CACHE),data.cache_dir=$(CACHE)) $(if $(MOCHI_PATH),model.path=$(MOCHI_PATH)) \
		$(if $(OUT),output_dir=$(OUT)) $(if $(STRATEGY),configs/strategy/$(STRATEGY).yaml) $(ARGS)

resume: $(VENV)/.installed ## resume the last checkpoint of a run: make resume REL=handshake [OUT=...]
	$(MAKE) train REL=$(REL) ARGS="resume=last $(ARGS)"

smoke: $(VENV)/.installed ## train the tiny random model for a few CPU steps on a random cache
	$(RELVID) random-cache outputs/smoke/cache --relation $(REL)
	$(RELVID) train configs/tiny.yaml --relation $(REL) data.cache_dir=outputs/smoke/cache \
		output_dir=outputs/smoke/run-$$(date +%Y%m%d-%H%M%S) $(ARGS)

export: $(VENV)/.installed ## export a run's adapters to a diffusers LoRA: make export REL=handshake [OUT=...]
	$(RELVID) export $(or $(OUT),outputs/$$($(RELVID) relations --resolve $(REL)))/adapters \
		--out $(or $(OUT),outputs/$$($(RELVID) relations --resolve $(REL)))/diffusers_lora --triplet

tensorboard: $(VENV)/.installed ## serve the TensorBoard logs of all runs under outputs/
	$(VENV)/bin/tensorboard --logdir outputs

clean: ## remove caches and build files (keeps .venv and outputs/)
	rm -rf .pytest_cache build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +

.PHONY: help install test test-all train resume smoke export tensorboard clean
