# seqmix: the two set-up commands of the README (`make demo`, `make test`) and their parts.
PY ?= python3
PIP := $(PY) -m pip
# CPU machines take the CPU build of torch 2.13.0; on a GPU machine override: make install TORCH=torch
TORCH ?= torch==2.13.0
PACKAGES := -e kernels -e . -e plugins/based -e plugins/swa -e plugins/mamba -e plugins/attention

.PHONY: install install-test demo test

install:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q $(PACKAGES)

install-test: install
	$(PIP) install -q "pytest>=8" "hypothesis>=6"

demo: install
	seqmix build "based,swa64,mlp" --layers 36 --forward 64

test: install-test
	$(PY) -m pytest
