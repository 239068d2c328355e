"""The Triton sliding-window attention (`seqmix_swa.kernel.swa_attn`) against `swa_ref`, and the mixer on impl=triton.

Without a GPU the kernels run under the Triton interpreter on small shapes (fp32, fp16); `gpu` tests add bf16,
head dims 64 and 112 and long sequences. Launcher allocations are NaN-filled, so a skipped element fails.
Errors are normalised max errors against the fp32 reference on the same rounded inputs (seqmix.testing).
"""
import pytest
import torch

from seqmix.mixer import BlockContext
from seqmix.testing import assert_close, check_mixer_conformance
from seqmix_kernels.testing import (DEVICE, HAS_CUDA, HAS_TRITON, import_kernel_modules, kernel_dtypes,
                                    kernel_test_fixture)
from seqmix_swa.mixer import SlidingWindowAttention
from seqmix_swa.naive import swa_ref

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
kernel, decode = import_kernel_modules("seqmix_swa.kernel", "seqmix_kernels.decode_attention.triton") or (None, None)
DTYPES = kernel_dtypes()
_kernel_env = kernel_test_fixture(kernel, decode)


def compare(B, T, H, D, W, dtype, seed=0):
    """q, k, v as strided slices of one [B, T, 3, H, D] projection; kernel in dtype vs swa_ref in fp32."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, 3, H, D, generator=g).to(DEVICE, dtype)
    ker = qkv.detach().clone().requires_grad_()
    ref = qkv.detach().float().requires_grad_()
    o = kernel.swa_attn(*ker.unbind(2), W)
    o_ref = swa_ref(*ref.unbind(2), W)
    assert o.dtype == dtype and o.shape == (B, T, H, D)
    assert_close(o, o_ref, dtype, f"swa_attn T={T} D={D} W={W} output")
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    (o.float() * do).sum().backward()
    (o_ref * do).sum().backward()
    for i, name in enumerate("qkv"):
        got, want = ker.grad[:, :, i], ref.grad[:, :, i]
        if W == 1 and name != "v":  # a one-key softmax has zero score gradient: only rounding noise is allowed
            assert want.abs().max() == 0 and got.float().abs().max() < 1e-4, f"W=1: d{name} is not ~0"
        else:
            assert_close(got, want, dtype, f"swa_attn T={T} D={D} W={W} d{name}")


@pytest.mark.parametrize("B,T,H,D,W", [
    (2, 37, 2, 64, 7),     # two query/key blocks, the window crosses the block boundary
    (1, 45, 1, 112, 20),   # head dim 112 (padded to 128)
    (1, 100, 1, 16, 7),    # blocks outside the window are skipped, in the forward and in both backward loops
    (2, 21, 2, 12, 100),   # window longer than the sequence: plain causal attention
    (1, 33, 1, 16, 1),     # each query sees only itself
])
def test_kernel_matches_reference(B, T, H, D, W):
    compare(B, T, H, D, W, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_kernel_matches_reference_low_precision(dtype):
    compare(2, 37, 2, 64, 7, dtype)


def test_kernel_rejects_bad_inputs():
    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="window"):
        kernel.swa_attn(q, q, q, 0)
    with pytest.raises(TypeError, match="one dtype"):
        kernel.swa_attn(q, q.half(), q, 4)
    with pytest.raises(ValueError, match="head dims up to 128"):
        big = torch.randn(1, 4, 1, 144, device=DEVICE)
        kernel.swa_attn(big, big, big, 4)


@pytest.mark.parametrize("window", [7, 100])
def test_mixer_conformance_on_the_kernel(window):
    """The whole triangle with impl=triton (chunked prefill and the decode kernel's step use the ring buffer; window
    100 > the test's length: slots never wrap, 7: they do), and the kernel view
    vs the reference view: outputs and the gradients of x and every weight."""
    m = check_mixer_conformance((SlidingWindowAttention, {"window": window, "impl": "triton"}),
                                dtype=torch.float32, device=DEVICE, d_model=32, n_heads=2, B=2)
    assert m.impl == "triton"


def test_mixer_impl_resolution(monkeypatch):
    ctx = BlockContext(d_model=32, n_heads=2)
    assert SlidingWindowAttention(ctx, 8).to(DEVICE).impl == ("triton" if HAS_CUDA else "reference")
    wide = BlockContext(d_model=288, n_heads=2)  # head dim 144: beyond the kernel
    assert SlidingWindowAttention(wide, 8).to(DEVICE).impl == "reference"
    with pytest.raises(RuntimeError, match="head dims up to 128"):
        SlidingWindowAttention(wide, 8, impl="triton")
    if not HAS_CUDA:  # without the interpreter, a CPU machine cannot run the kernel: the error says why
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="impl='triton' cannot run on this machine.*CUDA"):
            SlidingWindowAttention(ctx, 8, impl="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [64, 112])
@pytest.mark.parametrize("W", [64, 129, 1000])
def test_gpu_training_shapes(W, D, dtype):
    compare(2, 1531, 3, D, W, dtype, seed=W + D)
