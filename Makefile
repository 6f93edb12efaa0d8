# raycap: `make demo` and `make test` are all a newcomer needs.
SHELL  := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := demo-output

.PHONY: demo test lint bench clean

# The venv is installed without precompiling (twice as fast); Python then compiles each module on first
# import. Where PYTHONDONTWRITEBYTECODE is set it would never keep the result, and every Ray worker would
# recompile torch and ray from source on start (~10 s of CPU each).
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-compile -e '.[test]' 2>&1 | { grep -v 'is ignored' || true; }
	$(BIN)/python -c "import raycap.pipeline, raycap.train, raycap.caption, raycap.evaluate, ray.data, torchvision, moto"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m raycap.demo --output $(DEMO)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/caption.py

clean:
	rm -rf $(DEMO) bench-output .pytest_cache
