"""Tests of the `swa` mixer: naive twin, window semantics, ring-buffer state, chunked prefill, conformance."""
import math

import pytest
import torch

from seqmix.mixer import ArgError, BlockContext, state_nbytes
from seqmix.testing import assert_close, check_mixer_conformance
from seqmix_kernels.rotary import rotary_ref
from seqmix_swa.mixer import SlidingWindowAttention, ring_positions
from seqmix_swa.naive import swa_ref

DTYPES = [torch.float32, torch.bfloat16]  # tolerances for both come from seqmix.testing.TOLERANCES
B, T, D, H = 3, 63, 48, 4  # odd sizes; head dim 12


def make(window=7, dtype=torch.float32, d_model=D, n_heads=H, seed=0, **kw) -> SlidingWindowAttention:
    torch.manual_seed(seed)
    ctx = BlockContext(d_model=d_model, n_heads=n_heads, layer_idx=0, n_blocks=2)
    return SlidingWindowAttention(ctx, window, **kw).to(dtype)


def inputs(dtype, b=B, t=T, d=D, seed=1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(b, t, d).to(dtype)


def expected(m: SlidingWindowAttention, x_BTD: torch.Tensor) -> torch.Tensor:
    """The module's output recomputed in fp32 from its weights with the einsum twin `swa_ref`."""
    Bx, Tx, Dx = x_BTD.shape
    qkv = (x_BTD.float() @ m.Wqkv.weight.float().T).view(Bx, Tx, 3, m.n_heads, m.head_dim)
    q_BTHD, k_BTHD, v_BTHD = qkv.unbind(2)
    q_BTHD, k_BTHD = rotary_ref(q_BTHD, 0, m.rotary_dim), rotary_ref(k_BTHD, 0, m.rotary_dim)
    o_BTHD = swa_ref(q_BTHD, k_BTHD, v_BTHD, m.window)
    return o_BTHD.reshape(Bx, Tx, Dx) @ m.out_proj.weight.float().T


def test_swa_ref_matches_per_query_loop():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 20, 2, 8, dtype=torch.float64) for _ in range(3))
    for window in (1, 3, 20, 50):
        o = swa_ref(q, k, v, window)
        for t in range(20):
            lo = max(0, t - window + 1)
            s = torch.einsum("bhd,bshd->bhs", q[:, t], k[:, lo:t + 1]) / math.sqrt(8)
            o_t = torch.einsum("bhs,bshd->bhd", s.softmax(-1), v[:, lo:t + 1])
            torch.testing.assert_close(o[:, t], o_t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window,kw", [(1, {}), (7, {}), (20, {"heads": 2}), (64, {"rotary_dim": 6}), (9, {"rotary_dim": 5})])
def test_forward_matches_naive_twin(dtype, window, kw):
    m = make(window, dtype, **kw)
    x = inputs(dtype)
    with torch.no_grad():
        assert_close(m(x), expected(m, x), dtype, f"swa:{window} {kw} forward vs swa_ref")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_window_one_is_the_value_path(dtype):
    m, x = make(1, dtype), inputs(dtype)
    with torch.no_grad():
        v_BTD = x @ m.Wqkv.weight[2 * D:].T
        assert_close(m(x), m.out_proj(v_BTD), dtype, "swa:1 vs out_proj(v)")
        assert not torch.allclose(make(2, dtype)(x).float(), m.out_proj(v_BTD).float(), atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [T, T + 40])
def test_window_covering_the_sequence_is_causal_attention(dtype, window):
    import seqmix_attention.mixer as attn_mod
    m, x = make(window, dtype), inputs(dtype)
    full = attn_mod.CausalAttention(m.ctx).to(dtype)
    full.load_state_dict(m.state_dict())  # same parameter names and shapes
    with torch.no_grad():
        assert_close(m(x), full(x), dtype, f"swa:{window} vs attn at T={T}")
        # and a window one short of T differs from it (the test can fail)
        assert not torch.allclose(make(T - 1, dtype)(x).float(), full(x).float(), atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [1, 7, 20, 64])
def test_chunked_prefill_from_none_then_step(dtype, window):
    """Chunks 17, 20, 26 (the first with state=None) equal one forward; then steps continue the forward."""
    m, x = make(window, dtype), inputs(dtype, t=T + 5)
    with torch.no_grad():
        y = m(x)
        ys, state, t0 = [], None, 0
        for c in (17, 20, 26):
            y_c, state = m(x[:, t0:t0 + c], state=state, return_state=True)
            ys.append(y_c)
            t0 += c
        assert_close(torch.cat(ys, 1), y[:, :T], dtype, f"swa:{window} chunked prefill")
        assert state["pos"].tolist() == [T] * B and state["k"].shape == (B, window, H, D // H)
        for t in range(T, T + 5):
            y_t, state = m.step(x[:, t], state)
            assert_close(y_t, y[:, t], dtype, f"swa:{window} step at {t} after prefill")


def test_ring_buffer_holds_rotated_keys_by_slot():
    W, Tp = 5, 13
    m, x = make(W), inputs(torch.float32, t=Tp)
    with torch.no_grad():
        _, state = m(x, return_state=True)
        k_BTHD = (x @ m.Wqkv.weight[D:2 * D].T).view(B, Tp, H, D // H)
        k_BTHD = rotary_ref(k_BTHD, 0, m.rotary_dim)
    for p in range(Tp - W, Tp):
        torch.testing.assert_close(state["k"][:, p % W], k_BTHD[:, p])
    assert ring_positions(state["pos"], W).tolist() == [[10, 11, 12, 8, 9]] * B


def test_per_sequence_positions():
    """A batch whose sequences sit at different positions steps like each sequence on its own."""
    W, m = 6, make(6)
    x = inputs(torch.float32, b=2, t=12)
    with torch.no_grad():
        lens, states = (3, 9), []
        for b, n in enumerate(lens):
            states.append(m(x[b:b + 1, :n], return_state=True)[1])
        batched = {k: torch.cat([s[k] for s in states]) for k in states[0]}
        x_t = torch.stack([x[0, lens[0]], x[1, lens[1]]])
        y_t, _ = m.step(x_t, batched)
        y2, _ = m(x_t[:, None], state={k: torch.cat([s[k] for s in states]) for k in states[0]},
                  return_state=True)
        for b, n in enumerate(lens):
            torch.testing.assert_close(y_t[b], m(x[b:b + 1, :n + 1])[0, n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y2[:, 0], y_t, rtol=1e-5, atol=1e-6)
    assert batched["pos"].tolist() == [4, 10]


def test_state_bytes_constant_in_length():
    m = make(129, n_heads=4)
    for dtype in DTYPES:
        nbytes = 2 * B * 129 * H * (D // H) * dtype.itemsize + 8 * B
        assert m.state_bytes(B, 10, dtype) == m.state_bytes(B, 10**6, dtype) == nbytes
        assert state_nbytes(m.init_state(B, max_seqlen=10**6, dtype=dtype)) == nbytes


def test_flops_per_token():
    m = make(16)
    assert m.flops_per_token(4) == 8 * D * D + 4 * 4 * D
    assert m.flops_per_token(16) == m.flops_per_token(10**6) == 8 * D * D + 4 * 16 * D


@pytest.mark.parametrize("kw,match", [
    ({"window": 0}, "window"), ({"heads": 5}, "heads"), ({"rotary_dim": 13}, "rotates 14 channels"),
    ({"rotary_dim": 14}, "rotary_dim"), ({"impl": "flash"}, "impl"),
])
def test_bad_args_are_rejected(kw, match):
    ctx = BlockContext(d_model=D, n_heads=H)
    with pytest.raises(ArgError, match=match):
        SlidingWindowAttention(ctx, **kw)


def test_impls_and_parameter_layout():
    impls = SlidingWindowAttention.available_impls("cpu")
    assert set(impls) == {"triton", "reference"} and impls["reference"] is None
    m = make(129, d_model=64, n_heads=4)
    assert m.impl == "reference"  # auto: the kernel only for a layer on a CUDA device
    if torch.cuda.is_available():
        assert m.cuda().impl == "triton"
    assert {n: tuple(p.shape) for n, p in m.named_parameters()} == {"Wqkv.weight": (192, 64),
                                                                    "out_proj.weight": (64, 64)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("args", [{"window": 1}, {"window": 7}, {"window": 20, "heads": 2}, {"window": 100}])
def test_conformance(dtype, args):
    check_mixer_conformance((SlidingWindowAttention, args), dtype=dtype, d_model=D, n_heads=H)
