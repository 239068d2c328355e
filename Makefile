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

# install-test adds the test tools, the [train], [eval] (lm-eval 0.4.13) and [synthetics] (matplotlib, for
# mqar.png) extras and transformers, and compiles DeepSpeed's CPU communication op once for this environment
# (about 2 minutes on 2 cores) so no two-process training test has to.
install-test: install
	$(PIP) install -q "pytest>=8" "hypothesis>=6"
	$(PIP) install -q "triton==3.9.0"  # the kernel tests run under Triton's CPU interpreter (no GPU needed)
	$(PIP) install -q -e ".[train,eval,synthetics]"
	$(PIP) install -q "transformers==5.24.0"  # tests/test_convert_hf.py checks imports against transformers itself
	$(PY) -c "from seqmix.train.ds_ops import build_comm_op; build_comm_op()"  # into this environment's own folder

demo: install
	seqmix build "based,swa64,mlp" --layers 36 --forward 64

test: install-test
	$(PY) -m pytest
