"""Split-K decode attention against its fp32 reference: ragged lengths, grouped heads, head dims 64/70/112/128, strides.

Under the Triton interpreter on CPU (small shapes, fp32/fp16); `gpu` tests add bf16, attn-1b's shape and more splits.
Cache rows past each sequence's length hold NaN, so a kernel that reads (and uses) one fails; partial buffers are
NaN-filled too (`kernel_test_fixture`).
"""
import pytest
import torch

from seqmix.testing import assert_close
from seqmix_kernels.decode_attention import decode_attention_ref
from seqmix_kernels.testing import DEVICE, HAS_CUDA, import_kernel_modules, kernel_dtypes, kernel_test_fixture

(mod,) = import_kernel_modules("seqmix_kernels.decode_attention.triton")
DTYPES = kernel_dtypes()
_kernel_env = kernel_test_fixture(mod)


def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")(test))


def case(B, S, H, K, D, dtype, lens, seed=0, cache_dtype=None, cache_dim=None):
    """q [B, H, D], a [B, S, K, Dc] cache (Dc = cache_dim or D, the padding zero) with NaN in every row at or past
    len[b], and len [B] (int64)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g).to(DEVICE, dtype)
    Dc = cache_dim or D
    k, v = torch.zeros(B, S, K, Dc), torch.zeros(B, S, K, Dc)
    k[..., :D] = 2 * torch.randn(B, S, K, D, generator=g)
    v[..., :D] = torch.randn(B, S, K, D, generator=g)
    len_B = torch.tensor(lens, dtype=torch.int64)
    past_BS = torch.arange(S)[None] >= len_B[:, None]
    k[past_BS], v[past_BS] = float("nan"), float("nan")
    cd = cache_dtype or dtype
    return q, k.to(DEVICE, cd), v.to(DEVICE, cd), len_B.to(DEVICE)


def check(q, k, v, len_B, what):
    if q.dtype != torch.float32:  # the register-sum variant (bench_decode_attention's other column) as well
        o = mod.decode_attention_fwd(q, k, v, len_B, q.shape[-1] ** -0.5, dot=False)
        ref = decode_attention_ref(q.float(), k.float().nan_to_num(), v.float().nan_to_num(), len_B)
        assert torch.isfinite(o).all(), f"{what} (dot=False): non-finite output"
        assert_close(o, ref, q.dtype, what + " (dot=False)")
    o = mod.decode_attention(q, k, v, len_B)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert torch.isfinite(o).all(), f"{what}: non-finite output (a row past its length was read)"
    ref = decode_attention_ref(q.float(), k.float().nan_to_num(), v.float().nan_to_num(), len_B)
    assert_close(o, ref, q.dtype, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,K,D", [(4, 4, 64), (6, 2, 70), (7, 1, 16), (2, 2, 112)], ids=["mha64", "gqa3-70", "mqa7", "d112"])
def test_ragged_lengths(dtype, H, K, D):
    """Lengths 1, odd, a block boundary and the whole cache, in one batch."""
    S = 130
    q, k, v, len_B = case(4, S, H, K, D, dtype, [1, 67, 64, S])
    check(q, k, v, len_B, f"decode H={H} K={K} D={D}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_padded_cache_rows(dtype):
    """Head dim 70 in cache rows of 72 (the attn mixer's layout) and 12 in rows of 16."""
    for H, K, D, Dc in ((4, 2, 70, 72), (3, 3, 12, 16)):
        q, k, v, len_B = case(3, 50, H, K, D, dtype, [50, 1, 33], cache_dim=Dc)
        check(q, k, v, len_B, f"decode D={D} in rows of {Dc}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_splits_and_strided_inputs(dtype):
    """Batch 1 with one kv head takes many splits (some empty for a short sequence); q and the cache are views."""
    q, k, v, len_B = case(1, 300, 2, 1, 32, dtype, [300])
    assert mod.num_splits(1, 1, 300, q.device, 64) > 1
    check(q, k, v, len_B, "decode, many splits")
    short = torch.tensor([5], device=q.device)
    check(q, k, v.nan_to_num(), short, "decode, most splits empty")  # rows past 5 of k are NaN: never read
    big_q = torch.randn(1, 2, 3, 32).to(DEVICE, dtype)  # q as a strided view [B, H, D] of a wider tensor
    big_kv = torch.randn(1, 300, 2, 1, 32).to(DEVICE, dtype)  # k, v as the two halves of one buffer
    check(big_q[:, :, 1], big_kv[:, :, 0], big_kv[:, :, 1], len_B, "decode, strided q/k/v")


def test_fp32_cache_with_half_queries():
    """The default state dtype is fp32; queries in fp16 are cast to it (ieee fp32 dots)."""
    q, k, v, len_B = case(2, 40, 4, 2, 64, torch.float16, [40, 9], cache_dtype=torch.float32)
    o = mod.decode_attention(q, k, v, len_B)
    ref = decode_attention_ref(q.float(), k.nan_to_num(), v.nan_to_num(), len_B)
    assert o.dtype == torch.float16
    assert_close(o, ref, torch.float16, "decode, fp32 cache")


def test_reference_matches_dense_softmax_attention():
    """The twin itself against SDPA over the valid rows with each kv head repeated (a different formulation)."""
    torch.manual_seed(0)
    B, S, H, K, D = 3, 20, 6, 3, 8
    q, k, v = torch.randn(B, H, D), torch.randn(B, S, K, D), torch.randn(B, S, K, D)
    len_B = torch.tensor([20, 1, 13])
    o = decode_attention_ref(q, k, v, len_B)
    for b in range(B):
        L = int(len_B[b])
        kb, vb = (t[b, :L].repeat_interleave(H // K, dim=1).transpose(0, 1) for t in (k, v))  # [H, L, D]
        ob = torch.nn.functional.scaled_dot_product_attention(q[b][:, None], kb, vb)[:, 0]
        assert torch.allclose(o[b], ob, atol=1e-6), b


def test_bad_shapes_are_errors():
    q, k, v, len_B = case(2, 16, 4, 3, 16, torch.float32, [16, 16])
    with pytest.raises(ValueError, match="K dividing H"):
        mod.decode_attention(q, k, v, len_B)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("B", [1, 3, 64])
@pytest.mark.parametrize("H,K,D,Dc", [(24, 24, 70, 72), (24, 24, 70, 70), (32, 8, 128, 128), (16, 16, 64, 64),
                                      (16, 4, 112, 112), (8, 1, 70, 72)],
                         ids=["attn1b-rows72", "d70-unpadded", "gqa4-128", "mha64", "gqa4-112", "mqa-rows72"])
def test_gpu_decode_shapes(dtype, B, H, K, D, Dc):
    S = 2048
    lens = [(97 * (b + 1) * 13) % S + 1 for b in range(B)]
    lens[0] = S
    q, k, v, len_B = case(B, S, H, K, D, dtype, lens, seed=B, cache_dim=Dc)
    assert mod._aligned8(k) == (Dc % 8 == 0)  # the 16-byte-vector path is the one under test where it should be
    check(q, k, v, len_B, f"decode B={B} H={H} K={K} D={D} in rows of {Dc}")
