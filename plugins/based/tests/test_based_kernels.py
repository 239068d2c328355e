"""Based Triton kernels against the references of seqmix_based.naive: forward, states, gradients, decode step.

On a machine without CUDA the kernels run under the Triton interpreter on small shapes; the `gpu` tests run
the full matrix (F in {8, 16, 24}, V in {16, 48, 64, 112, 128}, fp32/fp16/bf16) on a CUDA device.
Every buffer the launchers allocate is filled with NaN first, so an output element the kernels skip fails.
"""
import pytest
import torch

from seqmix_based.kernels import is_available
from seqmix_based.naive import based_linear_ref, based_step_ref, expanded_dim
from seqmix_kernels.testing import DEVICE, HAS_CUDA, HAS_TRITON, import_kernel_modules, kernel_test_fixture

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
# No GPU: the kernel modules are imported (and run) under the Triton interpreter.
_MODULES = ("attn", "attn_bwd", "attn_fwd", "attn_parallel", "step", "common")
attn, attn_bwd, attn_fwd, attn_parallel, step, common = (
    import_kernel_modules(*(f"seqmix_based.kernels.{m}" for m in _MODULES)) or [None] * len(_MODULES))
KernelConfig = common.KernelConfig if HAS_TRITON else None
_kernel_env = kernel_test_fixture(attn_fwd, attn_bwd, attn_parallel, step)  # interpreter, NaN-filled allocations

# Relative error ||x - ref|| / ||ref|| against the reference (fp32 math) on the same (rounded) inputs. fp32 dots are
# exact (ieee); fp16 runs its dots in tf32; bf16 rounds the dot operands (and the state) to bf16.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# several chunks, V blocks and chunks per program even at T = 63
SMALL = {p: KernelConfig(16, 16, 4, num_stages=2, chunks_per_program=2)
         for p in ("state", "out", "dstate", "dq", "dkv")} if HAS_TRITON else {}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all(), "non-finite values in the kernel's result"
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def prefill_state(B, H, F, V, g):
    """The state a 17-token prefill leaves, plus antisymmetric F x F parts that phi(q) cannot see (fp32)."""
    pre = [torch.randn(B, 17, H, d, generator=g, dtype=torch.float64) for d in (F, F, V)]
    _, state = based_linear_ref(*pre, output_final_state=True)
    for s in state:
        quad = torch.randn(s.shape[:-1] + (F, F), generator=g, dtype=torch.float64)
        s[..., 1 + F:] += (quad - quad.transpose(-1, -2)).flatten(-2)
    return tuple(s.float() for s in state)


def make_inputs(B, T, H, F, V, dtype, with_state, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, F, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g).to(dtype)
    return q, k, v, (prefill_state(B, H, F, V, g) if with_state else None)


def run_and_compare(B, T, H, F, V, dtype, *, init, final, configs=None, form=None, seed=0):
    """Kernel forward + backward vs based_linear_ref in fp64: o, final state, grads of q, k, v, initial state."""
    q, k, v, state = make_inputs(B, T, H, F, V, dtype, init, seed)
    E = expanded_dim(F)
    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(B, T, H, V, generator=g)
    dfinal = (torch.randn(B, H, V, E, generator=g), torch.randn(B, H, E, generator=g)) if final else None

    def loss_of(o, fin):
        loss = (o.double() * do.to(o.device, torch.float64)).sum()
        if final:
            loss = loss + sum((f.double() * d.to(f.device, torch.float64)).sum() for f, d in zip(fin, dfinal))
        return loss

    leaves = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
    st = [t.to(DEVICE).requires_grad_() for t in state] if init else []
    if configs is None and form is None:
        o, fin = attn.based_attn(*leaves, initial_state=tuple(st) if init else None, output_final_state=final)
    else:
        out = attn.BasedAttnFunction.apply(*leaves, *(st or [None, None]), final, 1e-12, configs, form)
        o, fin = (out[0], out[1:]) if final else (out, None)
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    grads = torch.autograd.grad(loss_of(o, fin), leaves + st)

    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_st = [t.double().requires_grad_() for t in state] if init else []
    o_ref, fin_ref = based_linear_ref(*ref_leaves, initial_state=tuple(ref_st) if init else None,
                                      output_final_state=final, chunk_size=T)
    ref_grads = torch.autograd.grad(loss_of(o_ref, fin_ref), ref_leaves + ref_st)

    tol = TOLERANCES[dtype]
    errs = {"o": rel_err(o.cpu(), o_ref)}
    if final:
        errs.update(kv_final=rel_err(fin[0].cpu(), fin_ref[0]), k_final=rel_err(fin[1].cpu(), fin_ref[1]))
    names = ["dq", "dk", "dv", "dkv0", "dk0"]
    errs.update({n: rel_err(a.cpu(), b) for n, a, b in zip(names, grads, ref_grads)})
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors above {tol:g} ({dtype}): {bad}; all: {errs}"


# ---------------------------------------------------------------- CPU (interpreter) and GPU alike: small shapes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attn_states_and_grads(dtype):
    """B=3, T=63 over 4 chunks of 16 and 2 V blocks: initial state in, final state out, every gradient."""
    run_and_compare(3, 63, 1, 16, 32, dtype, init=True, final=True, configs=SMALL)


@pytest.mark.parametrize("form", [None, "chunked"])
def test_attn_no_state_defaults(form):
    """No state: the default launch configs, the quadratic form (auto at this length) and the chunked one."""
    run_and_compare(3, 63, 1, 16, 32, torch.float32, init=False, final=False, form=form)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attn_parallel_blocks(dtype):
    """The quadratic form over several query and key blocks, with block sizes that differ."""
    cfg = {"pfwd": KernelConfig(32, 16, 4), "pdq": KernelConfig(16, 32, 4), "pdkv": KernelConfig(32, 16, 4)}
    run_and_compare(3, 63, 1, 16, 32, dtype, init=False, final=False, configs=cfg, form="parallel")


@pytest.mark.parametrize("F", [8, 24])
def test_attn_feature_dims(F):
    run_and_compare(1, 37, 1, F, 16, torch.float32, init=True, final=False, configs=SMALL)


def test_chunked_prefill_continues_the_sequence():
    q, k, v, _ = make_inputs(2, 40, 1, 16, 16, torch.float32, False)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    o_full, s_full = attn.based_attn(q, k, v, output_final_state=True)
    o_a, s_a = attn.based_attn(q[:, :23], k[:, :23], v[:, :23], output_final_state=True)
    o_b, s_b = attn.based_attn(q[:, 23:], k[:, 23:], v[:, 23:], initial_state=s_a, output_final_state=True)
    assert rel_err(torch.cat([o_a, o_b], 1).cpu(), o_full.cpu()) < 1e-5
    assert rel_err(s_b[0].cpu(), s_full[0].cpu()) < 1e-5 and rel_err(s_b[1].cpu(), s_full[1].cpu()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_step_matches_reference(dtype):
    B, H, F, V = 3, 2, 16, 112
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(B, H, F, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, H, V, generator=g).to(dtype)
    state = prefill_state(B, H, F, V, g)
    ref_state = tuple(s.clone() for s in state)  # the reference computes in fp32
    o_ref = based_step_ref(q.float(), k.float(), v.float(), ref_state)
    dev_state = tuple(s.to(DEVICE).contiguous() for s in state)
    o = step.based_step(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), dev_state)
    assert o.dtype == dtype
    assert rel_err(o.cpu(), o_ref) <= max(TOLERANCES[dtype], 4e-3)  # the output's own rounding
    assert rel_err(dev_state[0].cpu(), ref_state[0]) < 1e-6 and rel_err(dev_state[1].cpu(), ref_state[1]) < 1e-6


def test_errors_name_the_problem():
    q = torch.randn(1, 8, 1, 16)
    with pytest.raises(ValueError, match="multiple of 16"):
        attn.based_attn(q, q, torch.randn(1, 8, 1, 20))
    with pytest.raises(ValueError, match="initial_state"):
        attn.based_attn(q, q, torch.randn(1, 8, 1, 16), initial_state=(torch.zeros(1, 1, 16, 5), torch.zeros(1, 1, 5)))
    with pytest.raises(TypeError, match="one dtype"):
        attn.based_attn(q, q.half(), torch.randn(1, 8, 1, 16))


def test_is_available_says_why():
    assert "CUDA" in is_available("cpu")
    if HAS_CUDA:
        assert is_available("cuda") is None


# ---------------------------------------------------------------- GPU: the full matrix at sizes that use the chip
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GPU_CASES = [(F, V, dt) for F in (8, 16, 24) for V in (64, 112) for dt in DTYPES]
GPU_CASES += [(16, V, torch.bfloat16) for V in (16, 48, 128)]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("F,V,dtype", GPU_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_gpu_matrix(F, V, dtype):
    """Default launch configs, several chunks plus a ragged one, initial and final state, all gradients."""
    run_and_compare(2, 333, 3, F, V, dtype, init=True, final=True, seed=F + V)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("F,V,dtype", GPU_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_gpu_matrix_parallel_form(F, V, dtype):
    """No state: the quadratic form, with default launch configs and a ragged last block."""
    run_and_compare(2, 333, 3, F, V, dtype, init=False, final=False, form="parallel", seed=F + V + 1)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["parallel", "chunked"])
def test_gpu_no_state_odd_length(dtype, form):
    run_and_compare(3, 63, 4, 16, 64, dtype, init=False, final=False, form=form)
    run_and_compare(2, 1000, 2, 16, 64, dtype, init=False, final=False, form=form, seed=7)
