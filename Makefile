# One task runner for README, CI and humans.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# uv installs the project and its dependencies into the venv, in seconds from its cache instead of minutes (CI,
# the demo and the model job's two checkouts all install), from requirements.lock: every transitive dependency
# pinned with its hashes (`make lock` writes it from pyproject.toml; tests/test_units.py checks they agree).
UV     := uv==0.13.9
PIP    := pip==26.3
LOCK_OPTIONS := --generate-hashes --universal --python-version 3.11 --quiet
# The project's packages. Their bytecode is compiled ahead (`compile`), like the dependencies' at install
# (--compile-bytecode): with PYTHONDONTWRITEBYTECODE=1, which some machines set, no .pyc is ever written, so
# every process would compile every module it imports from source: about 9 s of CPU for a training run's
# imports (13.9 s instead of 4.4), in each of the suite's hundreds of processes.
PACKAGES := core adapters dask_engine tasks serving services flows deployments mlops

.PHONY: install install-beside compile lock browser-deps demo test test-fast lint docs format bench stack-up stack-down clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(PIP) $(UV)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode --require-hashes -r requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	@touch $@

## install-beside: CHECKOUT=path: that checkout's venv over this one's dependencies, when its requirements.lock is
## this one's (the model job's base checkout): only its own code is installed there, in seconds, instead of the same
## locked dependencies installed and compiled again (a minute of CPU); with another lock, its own `make install`
install-beside: install
	@test -n "$(CHECKOUT)" || { echo "usage: make install-beside CHECKOUT=path/to/another/checkout" >&2; exit 2; }
	@if cmp -s requirements.lock $(CHECKOUT)/requirements.lock; then \
	  $(BIN)/python -m venv --without-pip $(CHECKOUT)/$(VENV) && \
	  purelib='import sysconfig; print(sysconfig.get_paths()["purelib"])' && \
	  $(BIN)/python -c "$$purelib" > "$$($(CHECKOUT)/$(BIN)/python -c "$$purelib")/_locked_dependencies.pth" && \
	  $(BIN)/uv pip install --quiet --python $(CHECKOUT)/$(BIN)/python --no-deps -e $(CHECKOUT) && \
	  touch $(CHECKOUT)/$(VENV)/.installed && \
	  echo "$(CHECKOUT)/$(VENV): its own code over $(CURDIR)/$(VENV)'s dependencies (same requirements.lock)"; \
	else $(MAKE) -C $(CHECKOUT) install; fi

## compile: the project's bytecode, ahead of the processes that import it (only what changed is compiled again)
compile: install
	@$(BIN)/python -m compileall -q -j 0 $(PACKAGES) >/dev/null

## lock: resolve requirements.lock (the venv's) and infra/requirements-image.lock (the image's) again, with hashes,
## after a change to pyproject.toml's dependencies
lock:
	$(BIN)/uv pip compile pyproject.toml --extra dev $(LOCK_OPTIONS) -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml infra/image-requirements.in --extra kubernetes $(LOCK_OPTIONS) \
	  -o infra/requirements-image.lock

## browser-deps: Debian's chromium for the UI test (Playwright drives it; nothing is downloaded by Playwright).
## As root, apt-get; otherwise through passwordless sudo (GitHub's runners, which ship /usr/bin/chromium anyway).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo=sudo; \
	  else echo "the browser test needs Debian's chromium: sudo apt-get install chromium" >&2; exit 1; fi; \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

## demo: install, start the local stack, generate the default data and run the retraining flow once
demo: compile
	$(BIN)/mlops stack up
	$(BIN)/mlops data generate
	$(BIN)/mlops models add credit-risk --replace
	$(BIN)/mlops deploy
	$(BIN)/mlops train --model credit-risk

## test: install and run the whole suite against real servers (exit 5, "no tests ran", is a failure), on
## TEST_WORKERS processes, each with its own stack; a module's tests stay on one (their servers are shared)
## OMP_NUM_THREADS=1: every test process, server and flow runs OpenMP (scikit-learn's gradient boosting, trees) on
## one thread. With the suite's processes already filling both cores, more OpenMP threads only spin against each
## other: three small searches took 125-151 s with the default and 9-10 s with one thread, on a busy machine.
TEST_WORKERS ?= 2
TEST_ENV = OMP_NUM_THREADS=1
test: compile browser-deps
	@$(TEST_ENV) $(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

## test-fast: the tests that need no server (unit tests of core, adapters' pure parts, the CLI's answers)
test-fast: compile
	$(TEST_ENV) $(BIN)/pytest -m "not integration" -q

## docs: the documentation site on 127.0.0.1:8001 (the configuration reference is generated from the code)
docs: install
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8001

lint: install
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(BIN)/mkdocs build --strict --quiet --site-dir $$(mktemp -d)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/actionlint -shellcheck=$(BIN)/shellcheck -pyflakes= .github/workflows/*.yml

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: compile
	$(BIN)/python -m bench.search
	$(BIN)/python -m bench.flow_overhead
	$(BIN)/python -m bench.serving
	$(BIN)/python -m bench.hostile
	$(BIN)/python -m bench.quality
	$(BIN)/python -m bench.run_cost

stack-up: compile
	$(BIN)/mlops stack up

stack-down: install
	$(BIN)/mlops stack down

clean:
	-$(BIN)/mlops stack down
	rm -rf .mlops
