"""Tests of the `mamba` mixer and its selective-scan references (CPU, fp32 and bf16)."""
import pytest
import torch
import torch.nn.functional as F

from seqmix.mixer import ArgError, BlockContext, state_nbytes
from seqmix.testing import assert_close, check_mixer_conformance, make_mixer
from seqmix_mamba.mixer import Mamba
from seqmix_mamba.naive import selective_scan_chunked, selective_scan_ref, selective_state_step_ref

DTYPES = (torch.float32, torch.bfloat16)


def scan_inputs(B=3, T=63, E=16, N=16, dtype=torch.float32, log_dt=(-7.0, 1.6), seed=0):
    """Random scan operands; dt log-uniform in exp(log_dt), so dt*A sums reach -500 and beyond within a chunk."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, E, generator=g).to(dtype)
    dt = torch.exp(torch.empty(B, T, E).uniform_(*log_dt, generator=g))
    A = -torch.arange(1, N + 1.0).repeat(E, 1) * (0.5 + torch.rand(E, 1, generator=g))
    Bm, Cm = torch.randn(B, T, N, generator=g).to(dtype), torch.randn(B, T, N, generator=g).to(dtype)
    D = torch.randn(E, generator=g)
    h0 = torch.randn(B, E, N, generator=g)
    return u, dt, A, Bm, Cm, D, h0


# -- the functional scans -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [64, 37])
def test_chunked_scan_matches_sequential_long_and_stiff(dtype, chunk_size):
    u, dt, A, Bm, Cm, D, h0 = scan_inputs(T=300, dtype=dtype)
    assert (dt[:, :37, :, None] * A).sum(1).min() < -500  # within one chunk: the regime to survive
    y_ref, h_ref = selective_scan_ref(u, dt, A, Bm, Cm, D, initial_state_BEN=h0)
    y, h = selective_scan_chunked(u, dt, A, Bm, Cm, D, initial_state_BEN=h0, chunk_size=chunk_size)
    assert y.dtype == dtype and h.dtype == torch.float32
    assert_close(y, y_ref, dtype, f"chunked (L={chunk_size}) vs sequential y")
    assert_close(h, h_ref, torch.float32, f"chunked (L={chunk_size}) vs sequential final state")
    y0, _ = selective_scan_ref(u, dt, A, Bm, Cm, D)  # the initial state must matter, or the test proves little
    assert (y0.float() - y_ref.float()).abs().max() > 1e-2


@pytest.mark.parametrize("chunk_size", [1, 6, 20, 50])
def test_chunked_scan_edge_chunk_sizes(chunk_size):
    u, dt, A, Bm, Cm, D, h0 = scan_inputs(T=20)
    y_ref, h_ref = selective_scan_ref(u, dt, A, Bm, Cm, D, initial_state_BEN=h0)
    y, h = selective_scan_chunked(u, dt, A, Bm, Cm, D, initial_state_BEN=h0, chunk_size=chunk_size)
    assert_close(y, y_ref, torch.float32, f"chunked (L={chunk_size}) vs sequential y")
    assert_close(h, h_ref, torch.float32, f"chunked (L={chunk_size}) vs sequential final state")


def test_scans_match_float64():
    """Both fp32 scans sit within fp32 rounding of an fp64 evaluation (the exact segment sums pay off)."""
    args = scan_inputs(T=300)
    y64, h64 = selective_scan_ref(*[t.double() for t in args[:6]], initial_state_BEN=args[6].double())
    for scan in (selective_scan_ref, selective_scan_chunked):
        y, h = scan(*args[:6], initial_state_BEN=args[6])
        assert ((y.double() - y64).abs().max() / y64.abs().max()) < 1e-6, scan.__name__
        assert ((h.double() - h64).abs().max() / h64.abs().max()) < 1e-6, scan.__name__


def test_chunked_scan_extreme_decay_has_finite_gradients():
    u, dt, A, Bm, Cm, D, h0 = scan_inputs(T=100, log_dt=(-1.0, 4.0))  # dt up to ~55: dt*A down to ~ -1300/step
    leaves = [t.clone().requires_grad_(True) for t in (u, dt, A, Bm, Cm, D, h0)]
    grads = {}
    for scan in (selective_scan_ref, selective_scan_chunked):
        for t in leaves:
            t.grad = None
        y, h = scan(*leaves[:6], initial_state_BEN=leaves[6])
        (y.sum() + h.sum()).backward()
        grads[scan] = [t.grad.clone() for t in leaves]
    for name, g_ref, g in zip("u dt A B C D h0".split(), grads[selective_scan_ref], grads[selective_scan_chunked]):
        assert_close(g, g_ref, torch.float32, f"d/d{name} chunked vs sequential")


def test_chunked_scan_keeps_no_decay_matrices_for_backward():
    """Autograd must hold the chunk inputs and carried states only: less than ONE chunk's [B, E, N, L, L] decay
    matrix (without recomputation it would hold one per chunk, 8 here), and the gradients must still match."""
    g = torch.Generator().manual_seed(3)
    Bsz, T, E, N, L = 2, 256, 32, 8, 32
    u, dt = torch.randn(Bsz, T, E, generator=g), torch.rand(Bsz, T, E, generator=g) * 0.1 + 0.01
    A, Bm, Cm, D = -torch.rand(E, N, generator=g), torch.randn(Bsz, T, N, generator=g), torch.randn(
        Bsz, T, N, generator=g), torch.randn(E, generator=g)
    inputs = [t.clone().requires_grad_() for t in (u, dt, A, Bm, Cm, D)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        y, h = selective_scan_chunked(*inputs, chunk_size=L)
    assert sum(saved) < Bsz * E * N * L * L * 4
    (y.square().sum() + h.sum()).backward()
    ref = [t.clone().requires_grad_() for t in (u, dt, A, Bm, Cm, D)]
    y_ref, h_ref = selective_scan_ref(*ref)
    (y_ref.square().sum() + h_ref.sum()).backward()
    for got, want in zip(inputs, ref):
        assert_close(got.grad, want.grad, torch.float32, "gradient")


def test_state_step_matches_scan_in_place():
    u, dt, A, Bm, Cm, D, h0 = scan_inputs(T=20)
    y_ref, h_ref = selective_scan_ref(u, dt, A, Bm, Cm, D, initial_state_BEN=h0)
    state = h0.clone()
    ptr = state.data_ptr()
    ys = [selective_state_step_ref(state, u[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], D) for t in range(20)]
    assert state.data_ptr() == ptr
    assert_close(torch.stack(ys, 1), y_ref, torch.float32, "step-by-step y")
    assert_close(state, h_ref, torch.float32, "step-by-step state")


def test_scan_shape_errors_say_what_is_wrong():
    u, dt, A, Bm, Cm, D, _ = scan_inputs()
    with pytest.raises(ValueError, match="B_BTN has shape"):
        selective_scan_chunked(u, dt, A, Bm[:, :, :3], Cm, D)


# -- the mixer ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec, d_model", [("mamba", 32), ("mamba:8:1:d_conv=3:chunk_size=16:dt_rank=5", 48)])
def test_conformance(spec, d_model, dtype):
    """Shared suite: views (sequential vs chunked, incl. gradients), recurrence, step after prefill,
    chunked prefill 17/20/26 of T=63 (chunk_size 16 puts scan chunks across prefill boundaries),
    causality, state_bytes; B=3, T=63."""
    check_mixer_conformance(spec, dtype=dtype, d_model=d_model)


def test_matches_mamba_ssm_layout_with_nn_conv1d():
    """The conv weight orientation is mamba-ssm's: nn.Conv1d(padding=d_conv-1)[..., :T] gives the same output."""
    m = make_mixer("mamba:impl=sequential", d_model=32)
    x = torch.randn(3, 63, 32)
    xi, z = m.in_proj(x).chunk(2, dim=-1)
    u = F.silu(m.conv1d(xi.transpose(1, 2))[..., :63]).transpose(1, 2)
    dt_low, Bm, Cm = m.x_proj(u).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    y, _ = selective_scan_ref(u, F.softplus(m.dt_proj(dt_low)), -torch.exp(m.A_log), Bm, Cm, m.D)
    with torch.no_grad():
        assert_close(m(x), m.out_proj(y * F.silu(z)), torch.float32, "mixer vs mamba-ssm-style composition")


def test_bf16_mixer_tracks_fp32():
    m32 = make_mixer("mamba", d_model=48)
    m16 = make_mixer("mamba", d_model=48, dtype=torch.bfloat16)
    m32.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})
    x = torch.randn(3, 63, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        y16, y32 = m16(x), m32(x.float())
    assert y16.dtype == torch.bfloat16
    assert_close(y16, y32, torch.bfloat16, "bf16 mixer vs fp32 mixer (same weights)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_state_layout_dtypes_and_in_place_updates(dtype):
    m = make_mixer("mamba:impl=chunked:chunk_size=16", dtype=dtype)
    x = torch.randn(3, 40, 48, dtype=dtype)
    st = m.init_state(3, max_seqlen=40, dtype=dtype)
    assert st["conv"].shape == (3, m.d_inner, 4) and st["conv"].dtype == dtype
    assert st["ssm"].shape == (3, m.d_inner, 16) and st["ssm"].dtype == torch.float32
    with torch.no_grad():
        before = {k: v.clone() for k, v in st.items()}
        m(x, state=st)  # no return_state: the state is read, not written
        assert all(torch.equal(st[k], before[k]) for k in st)
        ptrs = {k: v.data_ptr() for k, v in st.items()}
        _, st2 = m(x, state=st, return_state=True)
        assert st2 is st and {k: v.data_ptr() for k, v in st.items()} == ptrs
        assert not torch.equal(st["ssm"], before["ssm"])
        _, fresh = m(x, return_state=True)
        assert fresh["ssm"].dtype == torch.float32 and fresh["conv"].dtype == dtype
        assert all(torch.equal(fresh[k], st[k]) for k in st)
        _, st3 = m.step(x[:, 0], st)
        assert st3 is st and {k: v.data_ptr() for k, v in st.items()} == ptrs


def test_state_bytes_exact_and_constant():
    m = Mamba(BlockContext(d_model=1024, n_heads=16))
    for dtype, conv_bytes in ((torch.float32, 4), (torch.bfloat16, 2)):
        want = 2 * 2048 * 4 * conv_bytes + 2 * 2048 * 16 * 4
        for T in (1, 2048, 100_000):
            assert m.state_bytes(2, T, dtype) == want
            assert state_nbytes(m.init_state(2, max_seqlen=T, dtype=dtype, device="meta")) == want


def test_parameters_match_mamba_ssm_1024():
    m = Mamba(BlockContext(d_model=1024, n_heads=16))
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (4096, 1024), "conv1d.weight": (2048, 1, 4), "conv1d.bias": (2048,),
        "x_proj.weight": (96, 2048), "dt_proj.weight": (2048, 64), "dt_proj.bias": (2048,),
        "A_log": (2048, 16), "D": (2048,), "out_proj.weight": (1024, 2048),
    }
    expected = (1024 * 4096 + 2048 * 4 + 2048 + 2048 * (64 + 32) + 64 * 2048 + 2048 + 2048 * 16 + 2048
                + 2048 * 1024)
    assert sum(p.numel() for p in m.parameters()) == expected
    matmul_and_conv = 1024 * 4096 + 2048 * 96 + 64 * 2048 + 2048 * 1024 + 2048 * 4
    fl = m.flops_per_token(2048)
    assert fl == m.flops_per_token(1) and 2 * matmul_and_conv < fl < 2.1 * matmul_and_conv  # scan adds ~3%


def test_init_follows_mamba_ssm():
    torch.manual_seed(0)
    ctx = BlockContext(d_model=256, n_heads=4, n_blocks=8)
    m = Mamba(ctx, d_state=8)
    assert torch.equal(m.A_log, torch.log(torch.arange(1, 9.0)).repeat(512, 1))
    assert torch.equal(m.D, torch.ones(512))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert dt.log().std() > 0.9  # log-uniform over [log 1e-3, log 0.1] has std ~1.33
    assert m.dt_proj.weight.abs().max() <= 16 ** -0.5 and m.dt_rank == 16
    assert abs(m.out_proj.weight.std().item() - ctx.out_init_std) < 0.1 * ctx.out_init_std


def test_spec_args_bind_and_validate():
    m = make_mixer("mamba:8:3", d_model=32)
    assert (m.d_state, m.d_inner, m.impl, m.dt_rank) == (8, 96, "chunked", 2)
    m = make_mixer("mamba:d_state=4:impl=sequential:dt_rank=7", d_model=32)
    assert (m.d_state, m.impl, m.dt_rank, m.x_proj.out_features) == (4, "sequential", 7, 15)
    with pytest.raises(ArgError, match="impl must be one of"):
        Mamba(BlockContext(d_model=32, n_heads=4), impl="cuda")
    with pytest.raises(ArgError, match="d_conv must be <= 8"):
        Mamba(BlockContext(d_model=32, n_heads=4), d_conv=9)


def test_gradients_reach_every_parameter():
    m = make_mixer("mamba:chunk_size=16")
    x = torch.randn(3, 63, 48, requires_grad=True)
    m(x).square().mean().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, n
