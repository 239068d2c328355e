"""Tests of the `based` mixer: its views agree, carried state, decode step, gradients, state size, args."""
import logging

import pytest
import torch

from seqmix.mixer import ArgError, BlockContext, state_nbytes
from seqmix.testing import CHUNKS, assert_close, check_mixer_conformance
from seqmix_based.mixer import BasedLinearAttention
from seqmix_based.naive import expanded_dim, taylor_feature_map

B, T, D = 3, 63, 32
VIEWS = ("quadratic", "linear", "recurrent")
DTYPES = (torch.float32, torch.bfloat16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These shapes are tiny: intra-op threads only add overhead, and stall badly on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(impl="quadratic", *, feature_dim=16, heads=4, dtype=torch.float32, like=None, **kw):
    """A mixer with weights large enough (std 1/sqrt(d)) that q.k/sqrt(F) is O(1): non-uniform attention."""
    torch.manual_seed(0)
    ctx = BlockContext(d_model=D, n_heads=4, init_std=D**-0.5)
    m = BasedLinearAttention(ctx, impl=impl, feature_dim=feature_dim, heads=heads, chunk_size=16, **kw)
    if like is not None:
        m.load_state_dict(like.state_dict())
    return m.to(dtype)


def inputs(dtype=torch.float32, seed=1):
    torch.manual_seed(seed)
    return torch.randn(B, T, D).to(dtype)


def test_feature_map_reproduces_the_taylor_kernel():
    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 3, 16), torch.randn(2, 5, 3, 16)
    s = (q * k).sum(-1) / 4.0
    fq, fk = taylor_feature_map(q), taylor_feature_map(k)
    assert fq.shape[-1] == expanded_dim(16) == 273
    torch.testing.assert_close((fq * fk).sum(-1), 1 + s + s * s / 2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", (1, 4))
@pytest.mark.parametrize("feature_dim", (8, 16, 24))
@pytest.mark.parametrize("impl", ("linear", "recurrent"))
def test_views_match_the_quadratic_view(impl, feature_dim, heads, dtype):
    """Each view in `dtype` against the fp32 quadratic view on the same weights; T=63 with chunk 16."""
    ref = make("quadratic", feature_dim=feature_dim, heads=heads)
    m = make(impl, feature_dim=feature_dim, heads=heads, dtype=dtype, like=ref)
    x = inputs()
    with torch.no_grad():
        y_ref, st_ref = ref(x, return_state=True)
        y, st = m(x.to(dtype), return_state=True)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, f"{impl} vs quadratic")
    for name in ("kv", "k"):
        assert st[name].dtype == torch.float32
        assert_close(st[name], st_ref[name], dtype, f"{impl} vs quadratic: final state {name}")
    # Not a vacuous match: the attention is far from uniform, so a causal running mean of v is rejected.
    with torch.no_grad():
        v_BTD = ref.proj_v(x)
        mean_BTD = ref.out_proj(v_BTD.cumsum(1) / torch.arange(1, T + 1)[:, None])
    with pytest.raises(AssertionError):
        assert_close(mean_BTD, y_ref, dtype, "running mean")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", VIEWS)
def test_chunked_prefill_equals_one_forward(impl, dtype):
    """Chunks of 17/20/26: a new state from the first, then written in place into the same tensors."""
    m = make(impl, dtype=dtype)
    x = inputs(dtype)
    with torch.no_grad():
        y_full = m(x)
        ys, state, t0 = [], None, 0
        for c in CHUNKS:
            y, new = m(x[:, t0 : t0 + c], state=state, return_state=True)
            if state is not None:
                assert new is state and new["kv"].data_ptr() == kv_ptr, "a passed state is updated in place"
            state, kv_ptr, t0 = new, new["kv"].data_ptr(), t0 + c
            ys.append(y)
    assert t0 == T
    assert_close(torch.cat(ys, 1), y_full, dtype, f"{impl}: chunked prefill {CHUNKS}")


@pytest.mark.parametrize("impl", VIEWS)
def test_passed_state_is_read_only_without_return_state(impl):
    m = make(impl)
    x = inputs()
    with torch.no_grad():
        _, state = m(x[:, :10], return_state=True)
        before = {k: v.clone() for k, v in state.items()}
        y_a = m(x[:, 10:], state=state)
        y_b = m(x[:, 10:], state=state)
    for k in state:
        assert torch.equal(state[k], before[k])
    assert torch.equal(y_a, y_b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", VIEWS)
def test_step_after_prefill_equals_forward(impl, dtype):
    m = make(impl, dtype=dtype)
    x = inputs(dtype)
    P = 40
    with torch.no_grad():
        y_full = m(x)
        state = m.init_state(B, max_seqlen=T, dtype=dtype)
        y0, state = m(x[:, :P], state=state, return_state=True)
        kv = state["kv"]
        ys = []
        for t in range(P, T):
            y_t, state = m.step(x[:, t], state)
            ys.append(y_t)
    assert state["kv"] is kv, "step updates the state in place"
    assert_close(y0, y_full[:, :P], dtype, f"{impl}: prefill")
    assert_close(torch.stack(ys, 1), y_full[:, P:], dtype, f"{impl}: steps after a {P}-token prefill")


@pytest.mark.parametrize("impl", VIEWS)
def test_causal(impl):
    m = make(impl)
    x = inputs()
    x2 = x.clone()
    x2[:, 30:] = torch.randn_like(x2[:, 30:])
    with torch.no_grad():
        y, y2 = m(x), m(x2)
    torch.testing.assert_close(y2[:, :30], y[:, :30], rtol=0, atol=1e-6)
    assert (y2[:, 30:] - y[:, 30:]).abs().amax(-1).min() > 1e-3, "later outputs must see the change"


def _grads(m, x, cot):
    x = x.detach().clone().requires_grad_(True)
    (m(x).float() * cot).sum().backward()
    return {"x": x.grad, **{n: p.grad for n, p in m.named_parameters()}}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", ("linear", "recurrent"))
def test_gradients_match_the_quadratic_view(impl, dtype):
    ref = make("quadratic")
    m = make(impl, dtype=dtype, like=ref)
    x = inputs()[:, :33]  # chunk 16 -> a partial last chunk
    cot = torch.randn(x.shape)
    g_ref, g = _grads(ref, x, cot), _grads(m, x.to(dtype), cot)
    assert g.keys() == {"x", "proj_q.weight", "proj_k.weight", "proj_v.weight", "out_proj.weight"}
    for name, grad in g.items():
        assert grad is not None and grad.abs().max() > 0, f"no gradient for {name}"
        assert_close(grad, g_ref[name], dtype, f"{impl} vs quadratic: d/d{name}")


def test_gradients_flow_through_a_carried_state():
    """Training on chunks (truncated BPTT-free): d/dx of the first chunk through the state of the second."""
    ref, m = make("quadratic"), make("linear")
    m.load_state_dict(ref.state_dict())
    x = inputs()[:, :40]
    cot = torch.randn(x.shape)
    g_ref = _grads(ref, x, cot)["x"]
    xg = x.clone().requires_grad_(True)
    y0, st = m(xg[:, :25], return_state=True)
    y1 = m(xg[:, 25:], state=st)
    (torch.cat([y0, y1], 1) * cot).sum().backward()
    assert_close(xg.grad, g_ref, torch.float32, "chunked forward vs one forward: d/dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_state_bytes_equal_the_allocation(dtype):
    m = make("linear", feature_dim=8, heads=4, dtype=dtype)
    E, V = expanded_dim(8), D // 4
    for L in (1, T, 4096):
        st = m.init_state(B, max_seqlen=L, dtype=dtype)
        assert st["kv"].shape == (B, 4, V, E) and st["k"].shape == (B, 4, E)
        assert st["kv"].dtype == st["k"].dtype == torch.float32
        assert m.state_bytes(B, L, dtype) == state_nbytes(st) == 4 * B * 4 * (V + 1) * E
    with torch.no_grad():
        _, st = m(inputs(dtype)[:, :5], return_state=True)
    assert state_nbytes(st) == m.state_bytes(B, 5, dtype)


def test_published_layer_size():
    """d=1024, 16 heads, F=16: 2*1024*256 (q, k) + 2*1024^2 (v, out) weights; state 16 heads * (64 + 1) * 273."""
    m = BasedLinearAttention(BlockContext(d_model=1024, n_heads=16), impl="linear", feature_dim=16)
    assert sum(p.numel() for p in m.parameters()) == 2_621_440
    assert m.state_bytes(1, 2048) == 4 * 16 * (64 + 1) * 273
    assert m.flops_per_token(1) == m.flops_per_token(2048) == 5_242_880 + 1_118_208 + 17_472
    assert m.proj_q.weight.shape == (256, 1024) and m.out_proj.weight.shape == (1024, 1024)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_parallel_needs_a_kernel_and_cuda():
    reason = BasedLinearAttention.available_impls("cpu")["parallel"]
    assert reason is not None and "CUDA" in reason
    assert all(BasedLinearAttention.available_impls("cpu")[v] is None for v in VIEWS)
    with pytest.raises(RuntimeError, match=r"parallel.*CUDA.*auto, quadratic, linear, recurrent"):
        BasedLinearAttention(BlockContext(d_model=D, n_heads=4), impl="parallel")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_auto_resolves_once_to_linear_on_cpu(caplog):
    with caplog.at_level(logging.DEBUG, logger="seqmix.mixer"):
        m = BasedLinearAttention(BlockContext(d_model=D, n_heads=4, layer_idx=3))
        m(inputs()[:, :4])
    assert m.impl == "linear" and m.args["impl"] == "auto"
    assert [r.getMessage() for r in caplog.records] == ["based layer 3: impl=linear (asked auto)"]


def test_args_are_validated():
    from seqmix.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match="auto, quadratic, linear, recurrent, parallel"):
        parse_spec("based:flash")
    for bad in ({"impl": "flash"}, {"feature_dim": 0}, {"feature_dim": 65}, {"heads": 5}, {"chunk_size": 0}):
        with pytest.raises(ArgError):
            BasedLinearAttention(BlockContext(d_model=D, n_heads=4), **bad)
    (layer,) = parse_spec("based:quadratic:8:2:chunk_size=16")
    m = BasedLinearAttention(BlockContext(d_model=D, n_heads=4), **layer.kwargs)
    assert (m.impl, m.feature_dim, m.n_heads, m.head_dim, m.chunk_size) == ("quadratic", 8, 2, 16, 16)


def test_registered_through_the_entry_point():
    from seqmix.registry import load_registry

    reg = load_registry()
    assert reg.get("based") is BasedLinearAttention
    assert reg.mixers["based"].dist == "seqmix-plugin-based"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", ("based", "based:quadratic:8:2", "based:recurrent:chunk_size=16"))
def test_conformance(spec, dtype):
    check_mixer_conformance(spec, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_parallel_kernel_passes_conformance_on_cuda(dtype):
    """impl=parallel (Triton forward/backward + decode step) against every reference view, on the GPU."""
    m = check_mixer_conformance("based:parallel", dtype=dtype, device="cuda", d_model=64, n_heads=4)
    assert m.impl == "parallel"
