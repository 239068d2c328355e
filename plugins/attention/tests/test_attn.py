"""Tests of the `attn` mixer: einsum twin with GQA, head dim 70 / rotary 35 (36 channels), KV cache, chunked prefill, conformance."""
import math

import pytest
import torch

from seqmix.mixer import ArgError, BlockContext, state_nbytes
from seqmix.testing import assert_close, check_mixer_conformance
from seqmix_attention.mixer import CausalAttention
from seqmix_kernels.rotary import rotary_ref

DTYPES = [torch.float32, torch.bfloat16]  # tolerances for both come from seqmix.testing.TOLERANCES
B, T = 3, 63  # odd sizes
# (d_model, n_heads, kwargs): MHA, GQA 8/2, MQA with partial RoPE and another base, head dim 70 with rotary 35
# (attn-1b: flash-attn's R = 35 rotates 36 channels with frequencies over 35)
# (attn-1b).
CONFIGS = [
    (48, 4, {}),
    (64, 8, {"kv_heads": 2}),
    (48, 4, {"kv_heads": 1, "rotary_dim": 6, "rope_base": 500.0}),
    (140, 2, {"rotary_dim": 35}),
]
IDS = ["mha", "gqa8/2", "mqa-rot6-base500", "dh70-rot36"]


def make(d_model=48, n_heads=4, dtype=torch.float32, seed=0, **kw) -> CausalAttention:
    torch.manual_seed(seed)
    ctx = BlockContext(d_model=d_model, n_heads=n_heads, layer_idx=0, n_blocks=2)
    return CausalAttention(ctx, **kw).to(dtype)


def inputs(dtype, d, b=B, t=T, seed=1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(b, t, d).to(dtype)


def attention_einsum(q_BTHD, k_BTKD, v_BTKD) -> torch.Tensor:
    """Causal softmax attention in fp32 with an explicit mask; query head h reads kv head h // (H / Hkv)."""
    H, Hkv = q_BTHD.shape[2], k_BTKD.shape[2]
    kv_of_head = torch.arange(H) // (H // Hkv)
    k_BTHD, v_BTHD = k_BTKD[:, :, kv_of_head].float(), v_BTKD[:, :, kv_of_head].float()
    s_BHTS = torch.einsum("bthd,bshd->bhts", q_BTHD.float(), k_BTHD) / math.sqrt(q_BTHD.shape[-1])
    Tq = q_BTHD.shape[1]
    causal_TS = torch.ones(Tq, Tq, dtype=torch.bool).tril()
    p_BHTS = s_BHTS.masked_fill(~causal_TS, float("-inf")).softmax(-1)
    return torch.einsum("bhts,bshd->bthd", p_BHTS, v_BTHD)


def expected(m: CausalAttention, x_BTD: torch.Tensor) -> torch.Tensor:
    """The module's output recomputed in fp32 from its weights (Wqkv layout [Q | K | V])."""
    Bx, Tx, Dx = x_BTD.shape
    H, Hkv, Dh = m.n_heads, m.n_kv_heads, m.head_dim
    qkv = x_BTD.float() @ m.Wqkv.weight.float().T
    q_BTHD = qkv[..., : H * Dh].reshape(Bx, Tx, H, Dh)
    k_BTKD = qkv[..., H * Dh: (H + Hkv) * Dh].reshape(Bx, Tx, Hkv, Dh)
    v_BTKD = qkv[..., (H + Hkv) * Dh:].reshape(Bx, Tx, Hkv, Dh)
    q_BTHD, k_BTKD = (rotary_ref(t, 0, m.rotary_dim, m.rope_base) for t in (q_BTHD, k_BTKD))
    o_BTHD = attention_einsum(q_BTHD, k_BTKD, v_BTKD)
    return o_BTHD.reshape(Bx, Tx, Dx) @ m.out_proj.weight.float().T


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d,h,kw", CONFIGS, ids=IDS)
def test_forward_matches_einsum_twin(dtype, d, h, kw):
    m, x = make(d, h, dtype, **kw), inputs(dtype, d)
    with torch.no_grad():
        assert_close(m(x), expected(m, x), dtype, f"attn {kw} forward vs einsum")


def test_rotary_dim_and_base_matter():
    """The twin is sensitive to the RoPE settings, so the comparisons above can fail."""
    m, x = make(140, 2, rotary_dim=35), inputs(torch.float32, 140)
    with torch.no_grad():
        m.Wqkv.weight.mul_(5)  # sharper attention, so a small change of the angles shows
        y = m(x)
        for kw in ({"rotary_dim": 34}, {"rotary_dim": 36}, {"rotary_dim": 35, "rope_base": 500.0}):
            other = make(140, 2, **kw)
            other.load_state_dict(m.state_dict())
            assert (other(x) - y).abs().max() > 1e-3 * y.abs().max()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d,h,kw", CONFIGS, ids=IDS)
def test_chunked_prefill_from_none_then_step(dtype, d, h, kw):
    """Chunks 17, 20, 26 (the first with state=None, a cache of exactly 17) equal one forward; steps continue.

    The carried state is a preallocated cache; the state=None chunk's exact-size cache is copied into it.
    """
    m, x = make(d, h, dtype, **kw), inputs(dtype, d, t=T + 5)
    with torch.no_grad():
        y = m(x)
        y0, small = m(x[:, :17], return_state=True)
        assert small["k"].shape == (B, 17, m.n_kv_heads, m.cache_dim) and small["pos"].tolist() == [17] * B
        state = m.init_state(B, max_seqlen=T + 5, dtype=dtype)
        state["k"][:, :17], state["v"][:, :17], state["pos"][:] = small["k"], small["v"], small["pos"]
        y1, state = m(x[:, 17:37], state=state, return_state=True)
        y2, state = m(x[:, 37:63], state=state, return_state=True)
        assert_close(torch.cat([y0, y1, y2], 1), y[:, :T], dtype, f"attn {kw} chunked prefill")
        for t in range(T, T + 5):
            y_t, state = m.step(x[:, t], state)
            assert_close(y_t, y[:, t], dtype, f"attn {kw} step at {t} after prefill")
        assert state["pos"].tolist() == [T + 5] * B


def test_per_sequence_positions():
    """A batch whose sequences sit at different positions steps and prefills like each sequence on its own."""
    m, x = make(), inputs(torch.float32, 48, b=2, t=12)
    lens = (3, 9)
    with torch.no_grad():
        batched = m.init_state(2, max_seqlen=16)
        for b, n in enumerate(lens):
            _, s = m(x[b:b + 1, :n], return_state=True)
            batched["k"][b, :n], batched["v"][b, :n], batched["pos"][b] = s["k"][0], s["v"][0], n
        x_t = torch.stack([x[0, lens[0]], x[1, lens[1]]])
        snapshot = {k: v.clone() for k, v in batched.items()}
        y_t, _ = m.step(x_t, batched)
        y_f, _ = m(x_t[:, None], state=snapshot, return_state=True)
        for b, n in enumerate(lens):
            torch.testing.assert_close(y_t[b], m(x[b:b + 1, :n + 1])[0, n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y_f[:, 0], y_t, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(snapshot["k"], batched["k"])
    assert batched["pos"].tolist() == [4, 10]


def test_cache_overflow_is_an_error_that_names_the_lengths():
    m, x = make(), inputs(torch.float32, 48, t=10)
    with torch.no_grad():
        _, state = m(x, return_state=True)  # exactly 10 rows
        with pytest.raises(RuntimeError, match=r"10 cached \+ 1 new tokens = 11 > max_seqlen 10"):
            m(x[:, :1], state=state, return_state=True)
        with pytest.raises(RuntimeError, match="max_seqlen >= 11"):
            m.step(x[:, 0], state)
        assert state["pos"].tolist() == [10] * B  # nothing was written


def test_state_bytes_grow_with_length():
    m = make(64, 8, kv_heads=2)
    for dtype in DTYPES:
        for L in (10, 1000):
            nbytes = 2 * B * L * 2 * 8 * dtype.itemsize + 8 * B
            assert m.state_bytes(B, L, dtype) == nbytes == state_nbytes(m.init_state(B, max_seqlen=L, dtype=dtype))


def test_flops_per_token():
    m = make(64, 8, kv_heads=2)  # Wqkv: 64 -> (8 + 4) * 8 = 96
    assert m.flops_per_token(100) == 2 * (64 * 96 + 64 * 64) + 4 * 100 * 64


def test_attn_360m_layer_has_four_d_squared_params():
    m = make(1024, 16, heads=16, kv_heads=16, rotary_dim=32)
    assert sum(p.numel() for p in m.parameters()) == 4 * 1024**2
    assert {n: tuple(p.shape) for n, p in m.named_parameters()} == {"Wqkv.weight": (3072, 1024),
                                                                    "out_proj.weight": (1024, 1024)}
    assert m.available_impls("cpu")["reference"] is None and m.impl == "reference"  # auto: the kernel on CUDA only


@pytest.mark.parametrize("kw,match", [
    ({"heads": 5}, "heads"), ({"kv_heads": 3}, "kv_heads=3 must divide heads=4"),
    ({"rotary_dim": 13}, "rotates 14 channels"), ({"rotary_dim": 14}, "rotary_dim"), ({"impl": "flash"}, "impl"),
])
def test_bad_args_are_rejected(kw, match):
    with pytest.raises(ArgError, match=match):
        CausalAttention(BlockContext(d_model=48, n_heads=4), **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d,h,kw", CONFIGS, ids=IDS)
def test_conformance(dtype, d, h, kw):
    check_mixer_conformance((CausalAttention, kw), dtype=dtype, d_model=d, n_heads=h)


def test_cache_rows_are_padded_to_a_multiple_of_8_and_the_padding_stays_zero():
    """Head dim 70 (attn-1b) is cached in rows of 72 (16-byte vectors for the decode kernel); nothing writes the pad."""
    m, x = make(140, 2, rotary_dim=35), inputs(torch.float32, 140, t=9)
    assert (m.head_dim, m.cache_dim) == (70, 72)
    with torch.no_grad():
        state = m.init_state(B, max_seqlen=12)
        m.prefill(x[:, :6], state)
        m(x[:, 6:8], state=state, return_state=True)
        m.step(x[:, 8], state)
    assert state["k"].shape == (B, 12, 2, 72) and state["k"][:, :9, :, :70].abs().amin() > 0
    assert not state["k"][..., 70:].any() and not state["v"][..., 70:].any()
