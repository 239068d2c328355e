"""The `attn` mixer on impl=triton: its decode step runs the split-K kernel (seqmix_kernels.decode_attention).

Without a GPU the kernel runs under the Triton interpreter (fp32); the `gpu` test covers bf16 and attn-1b's head
dim 70 with a CUDA-graph generate against the reference impl's tokens.
"""
import pytest
import torch

from seqmix.mixer import BlockContext
from seqmix.testing import assert_close, check_mixer_conformance
from seqmix_attention.mixer import CausalAttention
from seqmix_kernels.testing import DEVICE, HAS_CUDA, import_kernel_modules, kernel_test_fixture

(decode,) = import_kernel_modules("seqmix_kernels.decode_attention.triton")
_kernel_env = kernel_test_fixture(decode)


@pytest.mark.parametrize("kw", [{}, {"kv_heads": 2}, {"kv_heads": 1, "rotary_dim": 6}], ids=["mha", "gqa", "mqa"])
def test_conformance_on_the_decode_kernel(kw):
    """The whole triangle (forward = step by step = prefill then steps) with the kernel in every step."""
    m = check_mixer_conformance((CausalAttention, {**kw, "impl": "triton"}), dtype=torch.float32, device=DEVICE,
                                d_model=32, n_heads=4, B=2)
    assert m.impl == "triton"


def test_kernel_step_equals_reference_step_with_ragged_positions():
    """Sequences at different positions of one cache (as generate leaves them): kernel and masked-SDPA steps agree."""
    ctx = BlockContext(d_model=48, n_heads=6)
    ker = CausalAttention(ctx, kv_heads=3, impl="triton").to(DEVICE)
    ref = CausalAttention(ctx, kv_heads=3, impl="reference").to(DEVICE)
    ref.load_state_dict(ker.state_dict())
    torch.manual_seed(0)
    s_ker, s_ref = (m.init_state(3, max_seqlen=40, device=DEVICE) for m in (ker, ref))
    for state, m in ((s_ker, ker), (s_ref, ref)):  # prompts of 1, 17 and 30 tokens, each from its own row 0
        for b, n in enumerate((1, 17, 30)):
            torch.manual_seed(b)
            row = {k: v[b:b + 1] for k, v in state.items()}
            m.prefill(torch.randn(1, n, 48, device=DEVICE), row)
    with torch.no_grad():
        for t in range(5):
            x = torch.randn(3, 48, device=DEVICE)
            y_ker, _ = ker.step(x, s_ker)
            y_ref, _ = ref.step(x, s_ref)
            assert_close(y_ker, y_ref, torch.float32, f"attn step {t}, kernel vs reference")
    assert s_ker["pos"].tolist() == [6, 22, 35]


def test_auto_picks_the_kernel_on_cuda_only():
    m = CausalAttention(BlockContext(d_model=32, n_heads=4))
    assert m.impl == "reference"
    if HAS_CUDA:
        assert m.cuda().impl == "triton"
