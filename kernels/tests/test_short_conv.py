"""The fused short-conv kernel (conv + bias + SiLU + gate) against `short_conv_ref`: forward, state, grads, step.

Without a GPU the kernels run under the Triton interpreter on tiny shapes (fp32, fp16); `gpu` tests add bf16
and training-sized shapes. Launcher allocations are NaN-filled, so an element a kernel skips fails the test.
Errors are normalised max errors against the fp32 reference on the same rounded inputs (seqmix.testing).
"""
import subprocess
import sys

import pytest
import torch

from seqmix.builtins.conv import BaseConv
from seqmix.mixer import BlockContext
from seqmix.testing import assert_close, check_mixer_conformance
from seqmix_kernels.short_conv import short_conv_ref, short_conv_step_ref
from seqmix_kernels.testing import (DEVICE, HAS_CUDA, HAS_TRITON, import_kernel_modules, kernel_dtypes,
                                    kernel_test_fixture)

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
(sc,) = import_kernel_modules("seqmix_kernels.short_conv.triton") or (None,)
DTYPES = kernel_dtypes()
_kernel_env = kernel_test_fixture(sc)


@pytest.fixture(autouse=True)
def _exact_reference(monkeypatch):
    """cuDNN runs fp32 convolutions in TF32 by default: the fp32 reference (F.conv1d) must not."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def make_inputs(B, T, C, K, dtype, *, bias, state, gate, seed=0):
    """x and gate as the two halves of one [B, T, 2C] projection (strided views, as in the mixers)."""
    g = torch.Generator().manual_seed(seed)
    xg = torch.randn(B, T, 2 * C, generator=g).to(DEVICE, dtype)
    x, gt = xg.chunk(2, -1)
    w = (torch.randn(C, K, generator=g) / K**0.5).to(DEVICE, dtype)
    b = torch.randn(C, generator=g).to(DEVICE, dtype) if bias else None
    s = torch.randn(B, C, K, generator=g).to(DEVICE, dtype) if state else None
    return x, w, b, s, (gt if gate else None)


def compare(B, T, C, K, dtype, *, bias=True, state=True, gate=True, activation="silu", seed=0):
    """Kernel in `dtype` vs the reference in fp32 on the same inputs: y, new state and every gradient."""
    ins = make_inputs(B, T, C, K, dtype, bias=bias, state=state, gate=gate, seed=seed)
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in ins]
    ref_leaves = [None if t is None else t.detach().float().requires_grad_() for t in ins]
    x, w, b, s, gt = leaves
    y, new_s = sc.short_conv(x, w, b, state_BCK=s, activation=activation, gate_BTC=gt)
    rx, rw, rb, rs, rg = ref_leaves
    y_ref, new_ref = short_conv_ref(rx, rw, rb, state_BCK=rs, activation=activation, gate_BTC=rg)
    assert y.dtype == dtype and new_s.dtype == dtype and new_s.shape == (B, C, K)
    assert_close(y, y_ref, dtype, f"short_conv K={K} output")
    assert_close(new_s, new_ref, dtype, f"short_conv K={K} new state")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    (y.float() * dy).sum().backward()
    (y_ref * dy).sum().backward()
    for name, a, r in zip(("x", "weight", "bias", "state", "gate"), leaves, ref_leaves):
        if a is not None:
            assert a.grad.dtype == a.dtype
            assert_close(a.grad, r.grad, dtype, f"short_conv K={K} d/d{name}")


@pytest.mark.parametrize("K,kw", [
    (2, {}), (3, {}), (4, {}),                                      # conv: gate, state, no bias (BaseConv)
    (4, {"bias": True, "gate": False, "state": False}),             # mamba: bias + SiLU, fresh sequence
    (3, {"gate": False, "activation": None}),                       # the bare convolution
])
def test_kernel_matches_reference(K, kw):
    """B=3, T=37, C=40 in fp32: two time tiles (the interpreter's), a partial channel block."""
    compare(3, 37, 40, K, torch.float32, **{"bias": False, **kw})


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_kernel_matches_reference_low_precision(dtype):
    compare(3, 37, 40, 3, dtype, bias=True)


def test_long_run_of_tiles_per_program():
    """B=1, T=100: the backward programs each walk several time tiles, carrying dw and dbias across them."""
    compare(1, 100, 24, 3, torch.float32, bias=True)


def test_short_sequence_shorter_than_kernel():
    """T < K - 1: every output reads the carried state; its gradient flows to the state's slots 1..K-1."""
    compare(2, 2, 24, 4, torch.float32, bias=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_forward_equals_one_forward(dtype):
    x, w, b, _, gt = make_inputs(2, 45, 24, 3, dtype, bias=True, state=False, gate=True)
    y_full, s_full = sc.short_conv(x, w, b, activation="silu", gate_BTC=gt)
    ys, s = [], None
    for t0, t1 in ((0, 1), (1, 20), (20, 45)):
        y, s = sc.short_conv(x[:, t0:t1], w, b, state_BCK=s, activation="silu", gate_BTC=gt[:, t0:t1])
        ys.append(y)
    assert torch.equal(torch.cat(ys, 1), y_full) and torch.equal(s, s_full)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate", [True, False])
def test_step_matches_reference(gate, dtype):
    x, w, b, s, gt = make_inputs(3, 1, 40, 3, dtype, bias=not gate, state=True, gate=gate)
    s_ref = s.clone()
    with torch.no_grad():
        y = sc.short_conv_step(x[:, 0], s, w, b, activation="silu", gate_BC=None if gt is None else gt[:, 0])
        y_ref = short_conv_step_ref(x[:, 0], s_ref, w, b, activation="silu", gate_BC=None if gt is None else gt[:, 0])
    assert_close(y, y_ref, dtype, "short_conv_step output")
    assert torch.equal(s, s_ref), "the state after one step differs from the reference's"


def test_step_refuses_autograd_and_bad_state():
    x, w, b, s, _ = make_inputs(2, 1, 8, 3, torch.float32, bias=True, state=True, gate=False)
    with pytest.raises(RuntimeError, match="inference-only"):
        sc.short_conv_step(x[:, 0], s, w.requires_grad_(), b)
    with torch.no_grad(), pytest.raises(ValueError, match="state_BCK"):
        sc.short_conv_step(x[:, 0], s[:, :, :2], w, b)


def test_conv_mixer_conformance_with_the_kernel():
    """The whole triangle on impl=triton, including kernel vs reference views (outputs and all gradients)."""
    m = check_mixer_conformance((BaseConv, {"impl": "triton"}), dtype=torch.float32, device=DEVICE, d_model=16,
                                n_heads=2, B=2)
    assert m.impl == "triton"


def test_mamba_conv_impl_triton_matches_reference():
    import seqmix_mamba.mixer as mamba
    ctx = BlockContext(d_model=16, n_heads=2)
    torch.manual_seed(0)
    ref = mamba.Mamba(ctx, conv_impl="reference").to(DEVICE)
    ker = mamba.Mamba(ctx, conv_impl="triton").to(DEVICE)
    ker.load_state_dict(ref.state_dict())
    x = torch.randn(2, 21, 16, device=DEVICE)
    outs = []
    for m in (ref, ker):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, m.conv1d.weight.grad, m.conv1d.bias.grad))
    for name, a, r in zip(("y", "dx", "dconv_w", "dconv_b"), outs[1], outs[0]):
        assert_close(a, r, torch.float32, f"mamba conv_impl=triton vs reference: {name}")
    with torch.no_grad():
        states = [m.init_state(2, max_seqlen=22, device=DEVICE) for m in (ref, ker)]
        for m, st in zip((ref, ker), states):
            m(x, state=st, return_state=True)
        ys = [m.step(x[:, 0], st)[0] for m, st in zip((ref, ker), states)]
    assert_close(ys[1], ys[0], torch.float32, "mamba step, conv_impl=triton vs reference")


def test_impl_resolution(monkeypatch):
    ctx = BlockContext(d_model=8, n_heads=2)
    assert BaseConv(ctx).impl == "reference"  # auto: the kernel only for a layer on a CUDA device
    if HAS_CUDA:
        assert BaseConv(ctx).cuda().impl == "triton" and BaseConv(ctx).cuda().cpu().impl == "reference"
    if not HAS_CUDA:
        monkeypatch.delenv("TRITON_INTERPRET")
        assert BaseConv.available_impls("cpu")["triton"].startswith("the Triton kernels need a CUDA device")
        with pytest.raises(RuntimeError, match="impl='triton' cannot run on this machine.*CUDA"):
            BaseConv(ctx, impl="triton")


def test_import_does_not_import_triton():
    code = ("import sys; import seqmix_kernels, seqmix_kernels.backend, seqmix.builtins.conv as c; "
            "from seqmix.mixer import BlockContext; c.BaseConv(BlockContext(8, 2), impl='reference'); "
            "assert 'triton' not in sys.modules, 'triton was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("K", [2, 3, 4])
def test_gpu_training_shapes(K, dtype):
    """Several channel blocks and long runs of time tiles; bias + gate + state (all code paths at once)."""
    compare(2, 1531, 1000, K, dtype, bias=True, seed=K)
    compare(3, 2048, 2048, K, dtype, bias=False, state=False, seed=K + 10)
