# Two commands do everything on a fresh machine:
#   make run   - install what the service needs, then serve the API + a worker on 127.0.0.1:8001
#   make test  - install what the tests need, then run them
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch 2.13.0 is what this project is tested with; on a GPU machine install
# your CUDA build of torch into the venv first and this step leaves it alone.
TORCH_SPEC ?= torch==2.13.0

RUN_STAMP := $(VENV)/.stamp-run
TEST_STAMP := $(VENV)/.stamp-test

.PHONY: run test typecheck browser bench clean-data tiny-model

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[engine]'
	touch $@

$(TEST_STAMP): $(RUN_STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e '.[engine,dev,infra]'
	touch $@

run: $(RUN_STAMP)
	$(BIN)/acestep-api

# mypy ([tool.mypy] in pyproject.toml) first: an adapter or engine that drifts from its port in
# service/ports.py fails the build before any test runs. Cached in .mypy_cache (about 1 s warm).
typecheck: $(TEST_STAMP)
	$(BIN)/python -m mypy

test: typecheck browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# Debian's chromium for the Studio's browser test (tests/test_studio_browser.py drives it with the
# python playwright of the dev extras). Needs root or passwordless sudo; when the install fails the
# test skips and names the reason from $(CHROMIUM_LOG). Installed once: later runs cost nothing.
CHROMIUM_LOG := $(VENV)/.chromium-install.log
browser: $(TEST_STAMP)
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || echo "sudo -n" ); \
	  echo "installing chromium (apt) for the Studio browser test..."; \
	  { $$SUDO apt-get install -y -q --no-install-recommends chromium fonts-liberation \
	    || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends chromium fonts-liberation; }; \
	  } > $(CHROMIUM_LOG) 2>&1 || echo "chromium not installed (see $(CHROMIUM_LOG)); the browser test will skip"; }

bench: $(RUN_STAMP)
	$(BIN)/python bench/engine.py

tiny-model: $(RUN_STAMP)
	$(BIN)/acestep-models make-tiny checkpoints/acestep-v15-turbo

clean-data:
	rm -rf data
