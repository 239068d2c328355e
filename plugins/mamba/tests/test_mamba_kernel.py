"""The Triton selective scan and decode step (`seqmix_mamba.kernel`) against the sequential reference, and the mixer
on impl=triton.

Without a GPU the kernels run under the Triton interpreter on small, odd shapes (fp32, fp16); `gpu` tests add bf16,
training-sized shapes, the automatic segment split and CUDA-graph capture of the step. Launcher allocations are
NaN-filled, so an element a kernel skips fails. The reference runs in fp64 on the same (rounded) inputs.
"""
import pytest
import torch

from seqmix.mixer import BlockContext
from seqmix.testing import assert_close, check_mixer_conformance
from seqmix_kernels.testing import (DEVICE, HAS_CUDA, HAS_TRITON, import_kernel_modules, kernel_dtypes,
                                    kernel_test_fixture)
from seqmix_mamba.mixer import Mamba
from seqmix_mamba.naive import selective_scan_fused_ref, selective_state_update_ref

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
(kernel,) = import_kernel_modules("seqmix_mamba.kernel") or (None,)
DTYPES = kernel_dtypes()
_kernel_env = kernel_test_fixture(kernel)
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0")


def make_inputs(B, T, E, N, dtype, seed=0, dt_shift=-1.0, strided=True):
    """Scan operands on DEVICE; B and C (and z) as strided slices of one projection, as the mixer passes them."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    proj = rnd(B, T, 2 * N + 3)
    bc = (proj[..., 1:N + 1], proj[..., N + 2:2 * N + 2]) if strided else (rnd(B, T, N), rnd(B, T, N))
    xz = rnd(B, T, 2 * E)
    u, z = xz[..., :E], xz[..., E:]
    ins = [u, rnd(B, T, E) + dt_shift, -torch.exp(rnd(E, N) * 0.5 + 0.3), *bc, rnd(E), z, rnd(E) * 0.5,
           rnd(B, E, N)]
    low = {0, 1, 3, 4, 6}  # the activations in the scan dtype; A, D, bias, h0 in fp32
    return [t.to(DEVICE, dtype if i in low else torch.float32) for i, t in enumerate(ins)]


def compare(B, T, E, N, dtype, *, use=NAMES, configs=None, dt_shift=-1.0, seed=0):
    """Kernel vs the fp64 reference: y, the final state and the gradients of every input in `use`, with a cotangent
    on both outputs."""
    ins = make_inputs(B, T, E, N, dtype, seed, dt_shift)
    ins = [t if n in use or n in ("u", "delta", "A", "B", "C") else None for n, t in zip(NAMES, ins)]
    ker = [None if t is None else t.detach().clone().requires_grad_() for t in ins]
    ref = [None if t is None else t.detach().double().requires_grad_() for t in ins]
    y, h = kernel.selective_scan(*ker[:8], initial_state_BEN=ker[8], configs=configs)
    y_ref, h_ref = selective_scan_fused_ref(*ref[:8], initial_state_BEN=ref[8])
    assert y.dtype == dtype and y.shape == (B, T, E) and h.dtype == torch.float32
    tol = dtype
    assert_close(y, y_ref, tol, f"selective_scan y (T={T}, E={E}, N={N})")
    assert_close(h, h_ref, torch.float32 if dtype == torch.float32 else tol, "selective_scan final state")
    g = torch.Generator().manual_seed(seed + 1)
    dy, dh = torch.randn(y.shape, generator=g).to(DEVICE), torch.randn(h.shape, generator=g).to(DEVICE)
    ((y.double() * dy).sum() + (h.double() * dh).sum()).backward()
    ((y_ref * dy).sum() + (h_ref * dh).sum()).backward()
    for name, k, r in zip(NAMES, ker, ref):
        if k is not None:
            assert k.grad is not None and k.grad.dtype == k.dtype, f"d{name}"
            assert_close(k.grad, r.grad, tol, f"selective_scan d{name} (T={T}, E={E}, N={N})")


@pytest.mark.parametrize("B,T,E,N,segments", [
    (2, 37, 20, 5, 1),   # odd sizes: two channel blocks (one partial), N padded to 8, chunks of 8 with a partial
    (1, 45, 16, 16, 3),  # three time segments in the forward and the backward, the last one partial
    (3, 9, 7, 1, None),  # one state per channel, T shorter than a chunk
])
def test_scan_matches_reference(B, T, E, N, segments):
    cfg = kernel.ScanConfig(16, 1, 8, segments)
    compare(B, T, E, N, torch.float32, configs=(cfg, cfg))


@pytest.mark.parametrize("use", [("u", "delta", "A", "B", "C"), ("D", "delta_bias"), ("z", "h0")], ids=str)
def test_scan_optional_inputs(use):
    """No D, gate, bias or initial state; each of them alone (their gradients included)."""
    compare(2, 19, 12, 4, torch.float32, use=use)


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_scan_low_precision(dtype):
    compare(2, 21, 20, 8, dtype)


def test_scan_stiff_decay_stays_finite():
    """dt up to ~e^3 (dt * A down to ~ -100 per step): the backward never divides by a decay."""
    compare(1, 24, 8, 4, torch.float32, dt_shift=2.0)


def test_scan_without_softplus_and_zero_length():
    ins = make_inputs(2, 11, 8, 4, torch.float32)
    ins[1] = ins[1].abs() * 0.1
    y, h = kernel.selective_scan(*ins[:8], delta_softplus=False, initial_state_BEN=ins[8])
    y_ref, h_ref = selective_scan_fused_ref(*[t.double() for t in ins[:8]], delta_softplus=False,
                                            initial_state_BEN=ins[8].double())
    assert_close(y, y_ref, torch.float32, "no softplus: y")
    assert_close(h, h_ref, torch.float32, "no softplus: state")
    y0, h0 = kernel.selective_scan(*[t[:, :0] if t.dim() == 3 else t for t in ins[:8]], initial_state_BEN=ins[8])
    assert y0.shape == (2, 0, 8) and torch.equal(h0, ins[8])


def test_scan_rejects_bad_inputs():
    ins = make_inputs(1, 4, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="B has shape"):
        kernel.selective_scan(ins[0], ins[1], ins[2], ins[3][..., :3], *ins[4:8])
    with pytest.raises(ValueError, match="N <= 64"):
        big = torch.zeros(8, 65, device=DEVICE)
        kernel.selective_scan(ins[0], ins[1], big, torch.zeros(1, 4, 65, device=DEVICE),
                              torch.zeros(1, 4, 65, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_state_update_in_place_matches_reference(dtype):
    B, E, N = 3, 20, 5
    ins = [t[:, 0] if t.dim() == 3 else t for t in make_inputs(B, 1, E, N, dtype)[:8]]
    store = torch.randn(B, 2, E, N, device=DEVICE)
    state = store[:, 1]  # a strided batch, as a slice of a bigger buffer
    ref_state = state.double().clone()
    ptr = state.data_ptr()
    for _ in range(3):
        y = kernel.selective_state_update(state, *ins)
        y_ref = selective_state_update_ref(ref_state, *[t.double() for t in ins])
        assert y.dtype == dtype
        assert_close(y, y_ref, dtype, "selective_state_update y")
    assert state.data_ptr() == ptr
    assert_close(state, ref_state, torch.float32 if dtype == torch.float32 else dtype, "state after 3 steps")


def test_state_update_leaves_other_rows_alone():
    B, E, N = 2, 20, 5
    ins = [t[:, 0] if t.dim() == 3 else t for t in make_inputs(B, 1, E, N, torch.float32)[:8]]
    store = torch.randn(B, 2, E, N, device=DEVICE)
    before = store[:, 0].clone()
    kernel.selective_state_update(store[:, 1], *ins)
    assert torch.equal(store[:, 0], before)


def test_mixer_conformance_on_the_kernel():
    """The whole triangle with impl=triton (prefill returning the state, chunked prefill from a carried state, the
    decode kernel), and the kernel view vs the sequential and chunked views: outputs and every gradient."""
    m = check_mixer_conformance("mamba:4:impl=triton:chunk_size=16", dtype=torch.float32, device=DEVICE,
                                d_model=16, B=2, T=40)
    assert m.impl == "triton"


def test_mixer_impl_resolution(monkeypatch):
    ctx = BlockContext(d_model=16, n_heads=2)
    assert Mamba(ctx, 4).to(DEVICE).impl == ("triton" if HAS_CUDA else "chunked")
    assert Mamba(ctx, 80).to(DEVICE).impl == "chunked"  # d_state beyond the kernel
    with pytest.raises(RuntimeError, match="<= 64"):
        Mamba(ctx, 80, impl="triton")
    if not HAS_CUDA:
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="impl='triton' cannot run on this machine.*CUDA"):
            Mamba(ctx, 4, impl="triton")


def test_custom_ops_pass_opcheck():
    """The default-config scan and the step are torch.library custom ops (opaque to torch.compile)."""
    ins = make_inputs(1, 9, 8, 4, torch.float32)
    leaves = [t.detach().requires_grad_() for t in ins]
    torch.library.opcheck(torch.ops.seqmix_mamba.selective_scan_fwd, (*leaves, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    step = [t[:, 0] if t.dim() == 3 else t for t in ins[:8]]
    torch.library.opcheck(torch.ops.seqmix_mamba.selective_state_update, (ins[8].clone(), *step, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_mixer_compiles_into_one_graph():
    """A mamba layer on impl=triton through torch.compile(fullgraph=True): no graph break (the scan and the conv
    are custom ops), and the compiled output and gradients equal the eager ones."""
    import copy

    torch._dynamo.reset()
    eager = Mamba(BlockContext(d_model=16, n_heads=2), 4, impl="triton").to(DEVICE)
    compiled = copy.deepcopy(eager)
    fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 19, 16, device=DEVICE)
    y_e, y_c = eager(x), fn(x)
    y_e.square().sum().backward()
    y_c.square().sum().backward()
    torch.testing.assert_close(y_c, y_e)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m: f"{name}: {m}")
    torch._dynamo.reset()


# -- GPU ------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,T,segments", [(2, 1531, 1), (1, 3001, None), (1, 3001, 5)])
def test_gpu_training_shapes(B, T, segments, dtype):
    """Long sequences in the default launch configs: one segment, the automatic split, and five segments."""
    f, b = kernel.default_configs(torch.device("cuda"), B, 200)
    compare(B, T, 200, 16, dtype, configs=(f._replace(segments=segments), b._replace(segments=segments)),
            seed=T + B)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_mixer_conformance(dtype):
    m = check_mixer_conformance("mamba", dtype=dtype, device="cuda", d_model=64)
    assert m.impl == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_step_replays_in_a_cuda_graph():
    B, E, N = 4, 256, 16
    ins = [t[:, 0] if t.dim() == 3 else t for t in make_inputs(B, 1, E, N, torch.bfloat16)[:8]]
    state = torch.randn(B, E, N, device="cuda")
    ref_state = state.double().clone()
    kernel.selective_state_update(state.clone(), *ins)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kernel.selective_state_update(state, *ins)
    for _ in range(3):
        graph.replay()
        y_ref = selective_state_update_ref(ref_state, *[t.double() for t in ins])
    torch.cuda.synchronize()
    assert_close(y, y_ref, torch.bfloat16, "graph-replayed step y")
    assert_close(state, ref_state, torch.float32, "graph-replayed state")
