"""The shared conformance suite, run for every registered mixer (fp32 tight, bf16 loose; B=3, T=63)."""
import pytest
import torch

from seqmix.registry import load_registry
from seqmix.testing import check_mixer_conformance

# One small, odd-sized configuration per mixer; every registered mixer must appear here or in EXTRA.
SPECS = {
    "based": "based:feature_dim=8",
    "swa": "swa:7",
    "attn": "attn:4:2",
    "conv": "conv",
    "mamba": "mamba:d_state=8",
    "mlp": "mlp:40",
}
EXTRA = ["based:quadratic:16:2", "based:recurrent:4:1", "swa:1", "swa:100", "conv:2", "conv:4",
         "attn:rotary_dim=4", "mamba:4:1:impl=sequential"]


def test_every_registered_mixer_is_covered():
    assert set(load_registry().names()) <= set(SPECS), "add the new mixer to SPECS"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_conformance(name, dtype):
    check_mixer_conformance(SPECS[name], dtype=dtype)


@pytest.mark.parametrize("spec", EXTRA)
def test_conformance_variants_fp32(spec):
    check_mixer_conformance(spec, dtype=torch.float32)
