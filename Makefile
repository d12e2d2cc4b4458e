# normserve: `make serve` and `make test` work on a fresh machine; everything installs into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | sha256sum | cut -c1-12)
REPOSITORY ?= model_repository
ARTIFACTS ?= artifacts

PERF_VENV := .perf-venv

.PHONY: help install compiled debian-tools perf-analyzer models serve test test-fast bench experiments image image-gpu lint format lock clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint requirements.lock --editable ".[gpu,train,dev,bench,native]"
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)  ## create .venv with every pinned dependency

models: $(STAMP)  ## train, fold, export and verify the default models (skips what is built)
	$(BIN)/python -m export.build --artifacts $(ARTIFACTS) --repository $(REPOSITORY)

# The request path as C extensions (service/compiled.py): rebuilt when a module's source changed since. Where
# no C compiler is found it says so, and the service runs the same modules from source.
compiled: $(STAMP)  ## compile the request path with Cython (about a minute; skipped while it is current)
	$(BIN)/python -m service.compile --if-stale --if-possible

serve: models compiled  ## build the default models if missing, then serve them on port 8000
	NORMSERVE_REPOSITORY=$(REPOSITORY) $(BIN)/python -m service

# Debian's packages that tests drive: chromium for the demo page (Playwright's own browser download needs
# the network at test time), prometheus and promtool for the monitoring files, haproxy for the fleet. Where they cannot be
# installed, those tests are skipped and say why. (podman is installed by docker/build-image.sh.)
DEBIAN_TOOLS := /usr/bin/chromium:chromium /usr/bin/promtool:prometheus /usr/lib/x86_64-linux-gnu/libb64.so.0d:libb64-0d \
	/usr/sbin/haproxy:haproxy
debian-tools:  ## install Debian's chromium, prometheus, libb64 (perf_analyzer's) and haproxy for their tests, where apt-get can
	@missing=$$(for t in $(DEBIAN_TOOLS); do [ -x "$${t%%:*}" ] || echo "$${t##*:}"; done); \
	if [ -z "$$missing" ]; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
			|| echo "make debian-tools: apt-get could not install $$missing; their tests will be skipped"; \
	else \
		echo "make debian-tools: $$missing missing, and no apt-get as root to install them; their tests will be skipped"; \
	fi

# Tests run on every core (pytest-xdist), a test file to a worker: what a module's tests share (a server,
# an image, a trained plan) is built once.
TEST_WORKERS ?= auto
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# Triton's perf_analyzer: only tritonclient 2.41.0's manylinux wheel ships it (newer ones do not). It needs
# libcudart.so.12 (from the CUDA runtime wheel, no GPU needed) and Debian's libb64; bench/perf_analyzer.py
# finds both. A venv of its own: that tritonclient would clash with the one the project pins.
perf-analyzer: debian-tools  ## Triton's perf_analyzer in .perf-venv, for make bench and its test
	@test -x $(PERF_VENV)/bin/python || $(PYTHON) -m venv $(PERF_VENV)
	@test -x $(PERF_VENV)/bin/perf_analyzer || $(PERF_VENV)/bin/python -m pip install --quiet --no-deps \
		tritonclient==2.41.0 nvidia-cuda-runtime-cu12==12.9.79 \
		|| echo "make perf-analyzer: could not install it; its test will be skipped"

# The tests run the request path as it ships: compiled. (make test-fast runs whatever is current: a module
# edited since its build runs from source.)
test: lint compiled debian-tools perf-analyzer  ## install everything, lint, and run the tests
	$(PYTEST)

test-fast: $(STAMP)  ## the tests without the slow ones (suite smoke, locust, training CLI, images, browser), for the edit-test loop
	$(PYTEST) -m "not slow"

# Images are built with podman from a local Debian base and wheels downloaded here (docker/build-image.sh),
# so they build without a registry; the Dockerfile builds unchanged with docker anywhere else.
image: models  ## the CPU image normserve:cpu, with the default models (podman; docs/deploy.md)
	PYTHON=$(BIN)/python docker/build-image.sh cpu normserve:cpu $(REPOSITORY)

image-gpu: models  ## the GPU image normserve:gpu (about 2.8 GB: CUDA 13 and cuDNN 9 wheels)
	PYTHON=$(BIN)/python docker/build-image.sh gpu normserve:gpu $(REPOSITORY)

bench: models compiled perf-analyzer  ## the benchmark suite (about 25 minutes): rewrites docs/benchmarks.md and docs/bench/
	$(BIN)/python -m bench.suite

experiments: models  ## measure every normalization claim (about 15 minutes; cached): writes docs/batchnorm.md
	$(BIN)/python -m experiments --artifacts $(ARTIFACTS) --repository $(REPOSITORY) --cache $(ARTIFACTS)/experiments

lint: $(STAMP)  ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy service repository
	$(BIN)/hadolint Dockerfile

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lock:  ## re-resolve the pins in requirements.lock from pyproject.toml, in a scratch venv
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet ".[gpu,train,dev,bench,native]"
	.lock-venv/bin/python -m pip freeze --all --exclude normserve --exclude pip | grep -v '^-e' | sed 's/+cpu$$//' > requirements.lock  # torch's local build tag is not on PyPI
	rm -rf .lock-venv

clean:  ## remove the venv, the built models and caches
	rm -rf $(VENV) $(PERF_VENV) $(ARTIFACTS) $(REPOSITORY) service/_compiled .pytest_cache .mypy_cache .ruff_cache *.egg-info
