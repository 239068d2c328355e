"""RMSNorm + residual and rotary kernels against their references; the chunked and Triton cross-entropy against
eager CE; the custom-op registrations (torch.library.opcheck) and one compiled graph through them.

Kernels run under the Triton interpreter without a GPU (tiny shapes, fp32/fp16); `gpu` tests add bf16 and
training-sized shapes. Launcher allocations are NaN-filled, so an element a kernel skips fails the test.
"""
import pytest
import torch

from seqmix.testing import assert_close
from seqmix_kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from seqmix_kernels.rmsnorm import rms_norm_residual_ref
from seqmix_kernels.rotary import rotary_ref
from seqmix_kernels.testing import (DEVICE, HAS_CUDA, HAS_TRITON, import_kernel_modules, kernel_dtypes,
                                    kernel_test_fixture)

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
norm_mod, rot_mod, ce_mod = import_kernel_modules(
    "seqmix_kernels.rmsnorm.triton", "seqmix_kernels.rotary.triton", "seqmix_kernels.cross_entropy.triton"
) or (None, None, None)
DTYPES = kernel_dtypes()
_kernel_env = kernel_test_fixture(norm_mod, rot_mod, ce_mod)


def gpu(test):
    """Mark a test as a GPU test: run by `pytest -m gpu` on a CUDA machine, skipped with a reason elsewhere."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")(test))


def leaves(*tensors):
    """(kernel leaves in their dtype, reference leaves in fp32), both requiring grad; None passes through."""
    ker = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    ref = [None if t is None else t.detach().float().requires_grad_() for t in tensors]
    return ker, ref


def check_grads(names, ker, ref, dtype, what):
    for name, a, r in zip(names, ker, ref):
        if a is not None:
            assert a.grad is not None and a.grad.dtype == a.dtype, f"{what}: d/d{name} missing or wrong dtype"
            assert_close(a.grad, r.grad, dtype, f"{what}: d/d{name}")


# -- RMSNorm fused with the residual add --------------------------------------------------------------------------
def run_norm(shape, dtype, with_x: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = shape[-1]
    x = torch.randn(shape, generator=g).to(DEVICE, dtype) if with_x else None
    res = (3 * torch.randn(shape, generator=g)).to(DEVICE)
    w = (1 + 0.2 * torch.randn(D, generator=g)).to(DEVICE, dtype)
    ker, ref = leaves(x, res, w)
    ref[1] = res.detach().clone().requires_grad_()  # the residual is fp32 on both paths
    y, r_out = norm_mod.rms_norm_residual(*ker)
    y_ref, r_ref = rms_norm_residual_ref(*ref)
    assert y.dtype == dtype and r_out.dtype == torch.float32
    assert_close(y, y_ref, dtype, "rms_norm_residual y")
    assert_close(r_out, r_ref, torch.float32, "rms_norm_residual new residual")
    gy = torch.Generator().manual_seed(seed + 1)
    dy, dr = torch.randn(shape, generator=gy).to(DEVICE), torch.randn(shape, generator=gy).to(DEVICE)
    ((y.float() * dy).sum() + (r_out * dr).sum() * with_x).backward()
    ((y_ref.float() * dy).sum() + (r_ref * dr).sum() * with_x).backward()
    check_grads(("x", "residual", "weight"), ker, ref, dtype, "rms_norm_residual")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_x", [True, False], ids=["add", "norm-only"])
def test_rms_norm_residual_matches_reference(with_x, dtype):
    run_norm((3, 37, 72), dtype, with_x)  # D = 72: a partial column block; 111 rows: a partial row block


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [1024, 1792, 2048])
@gpu
def test_gpu_rms_norm_residual(D, dtype):
    run_norm((4, 1531, D), dtype, True, seed=D)


# -- rotary --------------------------------------------------------------------------------------------------------
def run_rotary(B, T, H, D, rotary_dim, pos_offset, dtype, seed=0):
    """k as a strided slice of a fused [B, T, 3, H, D] projection, as the attention mixers produce it."""
    qkv = torch.randn(B, T, 3, H, D, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    (ker_qkv,), (ref_qkv,) = leaves(qkv)
    y = rot_mod.rotary(ker_qkv[:, :, 1], pos_offset, rotary_dim)
    y_ref = rotary_ref(ref_qkv[:, :, 1], pos_offset, rotary_dim)
    assert y.dtype == dtype and y.is_contiguous()
    assert_close(y, y_ref, dtype, f"rotary D={D} R={rotary_dim}")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    (y.float() * dy).sum().backward()
    (y_ref * dy).sum().backward()
    check_grads(("x",), [ker_qkv], [ref_qkv], dtype, f"rotary D={D} R={rotary_dim}")


def flash_attn_rotary(x_BTHD, R, base=10000.0):
    """flash-attn's RotaryEmbedding(dim=R), non-interleaved, written from its definition in fp64:
    inv_freq = 1 / base^(arange(0, R, 2) / R), cos/sin of t * inv_freq, rotate-half over 2 * len(inv_freq)."""
    inv = 1.0 / base ** (torch.arange(0, R, 2, dtype=torch.float64) / R)
    ang = torch.arange(x_BTHD.shape[1], dtype=torch.float64)[:, None] * inv  # [T, n]
    n = inv.numel()
    x = x_BTHD.double()
    x1, x2 = x[..., :n], x[..., n : 2 * n]
    c, s = ang.cos()[:, None], ang.sin()[:, None]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x[..., 2 * n :]], -1)


@pytest.mark.parametrize("D,R", [(70, 35), (70, 36), (16, 8), (14, 7), (12, 1), (10, 9)])
def test_rotary_dim_means_what_it_means_in_flash_attn(D, R):
    """An odd R rotates 2 * ceil(R/2) channels with frequencies over R (attn-1b: R = 35 rotates 36)."""
    x = torch.randn(2, 33, 3, D, generator=torch.Generator().manual_seed(D + R))
    want = flash_attn_rotary(x, R)
    assert (rotary_ref(x, 0, R).double() - want).abs().max() < 1e-5
    if R % 2 and R > 1:  # the old convention (denominator 2 * ceil(R/2)) differs measurably
        assert (rotary_ref(x, 0, R + 1).double() - want).abs().max() > 1e-3


def test_rotary_dim_wider_than_the_head_is_refused():
    with pytest.raises(ValueError, match="rotates 10 channels, more than the head dim 9"):
        rotary_ref(torch.randn(1, 2, 1, 9), 0, 10)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,R,offset", [(64, -1, 0), (70, 35, 5), (70, 36, 5), (12, 6, "per-sequence")])
def test_rotary_matches_reference(D, R, offset, dtype):
    pos = torch.tensor([3, 100, 7], device=DEVICE) if offset == "per-sequence" else offset
    run_rotary(3, 21, 3, D, R, pos, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D,R", [(64, -1), (112, -1), (70, 35), (70, 36)])
@gpu
def test_gpu_rotary(D, R, dtype):
    run_rotary(2, 4097, 16, D, R, 1000, dtype, seed=D)


# -- chunked cross-entropy over the tied head (plain PyTorch: runs everywhere) -------------------------------------
def run_ce(N_shape, D, V_pad, V, dtype, chunk, reduction="mean", seed=0, fn=linear_cross_entropy):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*N_shape, D, generator=g).to(DEVICE, dtype)
    w = (torch.randn(V_pad, D, generator=g) / D**0.5 * 3).to(DEVICE, dtype)
    t = torch.randint(0, V, N_shape, generator=g).to(DEVICE)
    t.view(-1)[::7] = -100  # some ignored positions
    ker, ref = leaves(h, w)
    loss = fn(*ker, t, vocab_size=V, reduction=reduction, chunk_size=chunk)
    loss_ref = linear_cross_entropy_ref(*ref, t, vocab_size=V, reduction=reduction)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, loss_ref, dtype, "linear_cross_entropy loss")
    (2.5 * loss).backward()
    (2.5 * loss_ref).backward()
    check_grads(("h", "weight"), ker, ref, dtype, "linear_cross_entropy")
    assert torch.equal(ker[1].grad[V:], torch.zeros_like(ker[1].grad[V:])), "padded vocab rows got a gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_matches_eager(reduction, dtype):
    run_ce((3, 37), 24, 104, 101, dtype, chunk=16, reduction=reduction)  # 7 chunks, the last partial


def test_linear_cross_entropy_no_grad_and_errors():
    h, w = torch.randn(2, 5, 8), torch.randn(16, 8)
    t = torch.randint(0, 16, (2, 5))
    with torch.no_grad():
        assert_close(linear_cross_entropy(h, w, t, chunk_size=3), linear_cross_entropy_ref(h, w, t),
                     torch.float32, "no-grad loss")
    with pytest.raises(TypeError, match="dtype"):
        linear_cross_entropy(h, w.double(), t)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, t[:, :4])


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_linear_cross_entropy(dtype):
    run_ce((4, 1023), 256, 50264, 50257, dtype, chunk=1024, seed=1)


# -- the Triton cross-entropy (logits one chunk at a time, the gradient written over them) -------------------------
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("chunk", [None, 16], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_triton_cross_entropy_matches_eager(reduction, chunk, dtype):
    # V = 150 > the interpreter's 64-column block: the online log-sum-exp spans three blocks; 154 padded rows
    run_ce((3, 37), 24, 154, 150, dtype, chunk=chunk, reduction=reduction, fn=ce_mod.linear_cross_entropy)


@needs_triton
def test_triton_cross_entropy_no_grad_and_errors():
    h, w = torch.randn(2, 5, 8, device=DEVICE), torch.randn(16, 8, device=DEVICE)
    t = torch.randint(0, 16, (2, 5), device=DEVICE)
    with torch.no_grad():
        assert_close(ce_mod.linear_cross_entropy(h, w, t), linear_cross_entropy_ref(h, w, t), torch.float32, "no grad")
    with pytest.raises(ValueError, match="vocab_size"):
        ce_mod.linear_cross_entropy(h, w, t, vocab_size=17)
    with pytest.raises(TypeError, match="dtype"):
        ce_mod.linear_cross_entropy(h, w.double(), t)


@gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_triton_cross_entropy(dtype):
    run_ce((4, 1023), 256, 50264, 50257, dtype, chunk=None, seed=1, fn=ce_mod.linear_cross_entropy)
    run_ce((2, 1023), 256, 50264, 50257, dtype, chunk=700, seed=2, fn=ce_mod.linear_cross_entropy)


# -- the custom ops: registrations checked by torch.library.opcheck, and one graph through them under compile -----
@needs_triton
def test_custom_ops_pass_opcheck():
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(2, 5, 24, generator=g).to(DEVICE), torch.randn(2, 5, 24, generator=g).to(DEVICE)
    w = (1 + 0.1 * torch.randn(24, generator=g)).to(DEVICE)
    torch.library.opcheck(torch.ops.seqmix_kernels.rms_norm_residual_fwd,
                          (x.view(-1, 24).requires_grad_(), r.view(-1, 24).requires_grad_(), w.requires_grad_(), 1e-5))
    torch.library.opcheck(torch.ops.seqmix_kernels.rms_norm_residual_fwd,
                          (None, r.view(-1, 24).requires_grad_(), w, 1e-5))
    q = torch.randn(2, 7, 3, 16, generator=g).to(DEVICE).requires_grad_()
    cos, sin = (t.contiguous() for t in rot_mod.rotary_cos_sin(2, 7, 16, 0, 10000.0, DEVICE))
    torch.library.opcheck(torch.ops.seqmix_kernels.rotary_apply, (q, cos, sin, False))
    h, hw = torch.randn(9, 8, generator=g).to(DEVICE).requires_grad_(), torch.randn(16, 8, generator=g).to(DEVICE)
    t = torch.randint(0, 13, (9,), generator=g).to(DEVICE)
    torch.library.opcheck(torch.ops.seqmix_kernels.linear_cross_entropy_fwd,
                          (h, hw.requires_grad_(), t, 13, -100, "mean", None, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@needs_triton
def test_fused_ops_compile_into_one_graph():
    """A block boundary (norm + residual) and a rotary through torch.compile(fullgraph=True): no graph break, and
    the compiled values and gradients equal the eager kernels'."""
    def boundary(x, r, w, q):
        y, r2 = norm_mod.rms_norm_residual(x, r, w)
        return rot_mod.rotary(y.view(*y.shape[:2], 2, -1) * q, 0, -1), r2

    g = torch.Generator().manual_seed(3)
    args = [torch.randn(2, 9, 32, generator=g).to(DEVICE), torch.randn(2, 9, 32, generator=g).to(DEVICE),
            torch.ones(32, device=DEVICE), torch.randn(2, 9, 2, 16, generator=g).to(DEVICE)]
    eager_in = [a.clone().requires_grad_() for a in args]
    comp_in = [a.clone().requires_grad_() for a in args]
    out = boundary(*eager_in)
    cout = torch.compile(boundary, backend="aot_eager", fullgraph=True)(*comp_in)
    for a, b in zip(out, cout):
        torch.testing.assert_close(a, b)
    sum(o.sum() for o in out).backward()
    sum(o.sum() for o in cout).backward()
    for a, b in zip(eager_in, comp_in):
        torch.testing.assert_close(a.grad, b.grad)
