# perk_fast developer targets. Each target installs what it needs first (idempotent).
PYTHON ?= python3
PIP := $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: install install-test bench test demo demo-train demo-train-2h gpu-check clean

# torch: the CPU build 2.13.0 when torch is missing (a bare `pip install torch` would pull a CUDA build)
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	@$(PIP) -e . 

install-test: install
	@$(PIP) -e ".[test,bench]"

bench: install-test
	$(PYTHON) bench/inner_loop.py

test: install-test
	$(PYTHON) -m pytest -q tests

demo: install
	$(PYTHON) -m perk_fast.demo

demo-train: install
	$(PYTHON) -m perk_fast.demo_train

# the 2-hour chain from a fresh base (CHAINS["direct"]); not the shipped model
demo-train-2h: install
	$(PYTHON) -m perk_fast.demo_train --recipe direct --out bench/results/demo_chain/direct

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build .pytest_cache *.egg-info
