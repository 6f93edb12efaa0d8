# raycap: `make demo` and `make test` are all a newcomer needs.
SHELL  := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := demo-output

.PHONY: help demo test test-fast lint bench gpu-bundle clean
.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# The venv is installed without precompiling (twice as fast); Python then compiles each module on first
# import. Where PYTHONDONTWRITEBYTECODE is set it would never keep the result, and every Ray worker would
# recompile torch and ray from source on start (~10 s of CPU each).
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-compile -e '.[test]' 2>&1 | { grep -v 'is ignored' || true; }
	$(BIN)/python -c "import raycap.pipeline, raycap.train, raycap.caption, raycap.evaluate, ray.data, torchvision, moto"
	touch $(STAMP)

demo: $(STAMP) ## synth -> extract -> train -> caption -> evaluate -> show on an embedded Ray (~10 min on 2 cores)
	$(BIN)/python -m raycap.demo --output $(DEMO)

test: lint ## lint, then the whole suite (about 13 min on 2 cores, 15 with the venv; the browser test skips without chromium)
	$(BIN)/pytest -q --durations=10

test-fast: lint ## unit tests and the quick Ray integration tests: no slow or multi-node tests (under 3 min on 2 cores)
	$(BIN)/pytest -q -m "not slow and not multinode" --durations=5

lint: $(STAMP) ## ruff check and ruff format --check, everywhere
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP) ## the speed and memory benchmarks, each printing a ratio against its baseline
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/plan.py
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/train_scale.py
	$(BIN)/python bench/caption.py

gpu-bundle: $(STAMP) ## Ray + what the GPU machine lacks, for bench/gpu.py --bundle (cp312; PYVER=3.12, <= 40 MiB)
	$(BIN)/python bench/gpu_bundle.py --python-version $(or $(PYVER),3.12)

clean: ## remove the demo output, bench output and pytest cache
	rm -rf $(DEMO) bench-output .pytest_cache
