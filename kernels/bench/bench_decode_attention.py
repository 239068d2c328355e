"""Decode attention (one query per sequence over a KV cache) on the GPU: the split-K kernel beside its peers, a table.

    python kernels/bench/bench_decode_attention.py --out kernels/bench/results

Rows: attn-1b's layer (24 heads of 70, no GQA), an MHA layer of head dim 64 and a GQA layer (32 query / 8 kv heads of 128), bf16, batch 1..256,
every sequence L cached tokens in a cache of S rows. Columns (ms per call, median, L2 flushed):
  kernel      seqmix_kernels.decode_attention (split-K, reads rows [0, L_b) of each sequence only)
  sums        the same kernel with fp32 products and sums instead of tensor-core dots (no padding of the group)
  rows%8      the kernel on the cache layout the `attn` mixer allocates (head dim padded to a multiple of 8),
              where that differs from D
  masked      what seqmix's `attn` step did before it: SDPA over all S rows with a length mask, kv heads repeated
  sdpa-exact  torch SDPA over exactly L rows (enable_gqa; possible only because every sequence has the same L)
  flash       flash_attn_with_kvcache (cache_seqlens = L), when flash-attn is installed
  floor       the K/V bytes of L rows per sequence / the measured copy bandwidth (read + write counted)
The ragged rows draw each sequence's length uniformly in [1, S]: the kernel's floor is the bytes of those rows.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import Budget, copy_bandwidth, fmt, header, ratio, table, try_ms, write  # noqa: E402

from seqmix_kernels.decode_attention.triton import decode_attention, decode_attention_fwd  # noqa: E402

SHAPES = {"attn-1b (24/24 x 70)": (24, 24, 70), "mha (16/16 x 64)": (16, 16, 64), "gqa (32/8 x 128)": (32, 8, 128)}


def masked_sdpa(q_BHD, k_BSKD, v_BSKD, len_B):
    """The reference step's attention: the whole cache, masked, kv heads repeated for their groups."""
    G = q_BHD.shape[1] // k_BSKD.shape[2]
    k, v = (t.repeat_interleave(G, dim=2) if G > 1 else t for t in (k_BSKD, v_BSKD))
    valid = (torch.arange(k.shape[1], device=q_BHD.device) < len_B[:, None])[:, None, None]
    return F.scaled_dot_product_attention(q_BHD[:, :, None], k.transpose(1, 2), v.transpose(1, 2), attn_mask=valid)


def flash_peer():
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_with_kvcache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,4,16,64,256")
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--out", default=None, help="directory for decode_attention_<date>.md")
    args = ap.parse_args()
    budget, bw, flash = Budget(args.budget_s), copy_bandwidth(), flash_peer()
    dt = torch.bfloat16
    name_of_report = f"decode_attention_{datetime.date.today().isoformat()}_{torch.cuda.get_device_name().split()[-1].lower()}.md"
    lines = header("Decode attention: one query per sequence over a KV cache", [
        f"bf16, median ms per call (L2 flushed), copy bandwidth {bw / 1e9:,.0f} GB/s. flash-attn: "
        f"{'installed' if flash else 'not installed (no column)'}. Command: `python kernels/bench/bench_decode_attention.py`.",
    ])
    cols = ["shape", "batch", "L (S)", "kernel", "sums", "rows%8", "masked", "sdpa-exact",
            *(["flash"] if flash else []), "floor", "kernel / floor", "masked / kernel"]
    rows = []
    torch.manual_seed(0)
    for name, (H, K, D) in SHAPES.items():
        for L in [int(x) for x in args.lengths.split(",")]:
            for B in [int(x) for x in args.batches.split(",")]:
                for ragged in (False, True):
                    if ragged and B < 16:
                        continue
                    if not budget.ok():
                        rows.append([name, str(B), str(L), "skipped (time budget)"] + [""] * (len(cols) - 4))
                        continue
                    S = L
                    try:
                        q = torch.randn(B, H, D, device="cuda", dtype=dt)
                        k, v = (torch.randn(B, S, K, D, device="cuda", dtype=dt) for _ in range(2))
                    except torch.OutOfMemoryError:
                        rows.append([name, str(B), str(L), "OOM"] + [""] * (len(cols) - 4))
                        continue
                    len_B = (torch.randint(1, S + 1, (B,), device="cuda") if ragged
                             else torch.full((B,), L, device="cuda", dtype=torch.int64))
                    ref = masked_sdpa(q, k, v, len_B)[:, :, 0]
                    err = (decode_attention(q, k, v, len_B).float() - ref.float()).abs().max().item()
                    assert err < 2e-2 * ref.float().abs().max().item() + 1e-3, f"kernel disagrees: {err}"
                    t_k = try_ms(lambda: decode_attention(q, k, v, len_B))
                    t_s = try_ms(lambda: decode_attention_fwd(q, k, v, len_B, D ** -0.5, dot=False))
                    t_p = None
                    if D % 8:
                        Dc = -(-D // 8) * 8
                        kp, vp = (torch.nn.functional.pad(t, (0, Dc - D)) for t in (k, v))
                        t_p = try_ms(lambda: decode_attention(q, kp, vp, len_B))
                        del kp, vp
                    t_m = try_ms(lambda: masked_sdpa(q, k, v, len_B))
                    t_e = None if ragged else try_ms(lambda: F.scaled_dot_product_attention(
                        q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), enable_gqa=K < H))
                    extra = []
                    if flash:
                        seq = len_B.to(torch.int32)
                        extra = [fmt(try_ms(lambda: flash(q[:, None], k, v, cache_seqlens=seq)))]
                    floor = 2 * int(len_B.sum()) * K * D * 2 / bw * 1e3
                    label = f"ragged U[1, {S}]" if ragged else f"{L} ({S})"
                    rows.append([name, str(B), label, fmt(t_k), fmt(t_s), fmt(t_p), fmt(t_m), fmt(t_e), *extra,
                                 fmt(floor, 4),
                                 ratio(t_k, floor), ratio(t_m, t_k)])
                    print(" | ".join(rows[-1]), flush=True)
                    del q, k, v
                    torch.cuda.empty_cache()
                    write(args.out, name_of_report, lines + table(cols, rows))
    out = lines + table(cols, rows)
    write(args.out, name_of_report, out)
    print("\n".join(out))


if __name__ == "__main__":
    main()
