"""Sliding-window attention: seqmix's Triton kernel vs flex_attention (sliding-window block mask) and masked SDPA.

B * T = 65,536 tokens, H = 16, head dim 64, bf16, W in {64, 128}, T in {1k .. 16k}; forward and forward+backward,
median of triton.testing.do_bench. The floor is the bytes-moved floor at the copy bandwidth measured in this run
(forward: q, k, v read, o written; backward adds do, o read and dq, dk, dv written; FLOPs are far below the
tensor-core rate at these windows). Also a launch-config sweep of the seqmix kernel at T = 8k, W = 128, each
config checked against the default's output, and the error against `swa_ref`.

    python kernels/bench/bench_swa.py --out DIR [--budget SECONDS]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchlib import (HEAD_DIM, TOKENS, TS, H, Budget, copy_bandwidth, fmt, header, median_ms, ratio, table, try_ms,
                      write)
from seqmix_swa.kernel import SwaAttnFunction, SwaConfig, swa_attn
from seqmix_swa.naive import swa_ref

WINDOWS = (64, 128)
BYTES_FWD = 4 * 2 * HEAD_DIM  # per token and head: q, k, v, o in bf16
BYTES_BWD = 8 * 2 * HEAD_DIM  # q, k, v, o, do in; dq, dk, dv out


def flex_peer():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as e:  # noqa: BLE001 - older torch
        return None, f"flex_attention not importable: {e}"
    return (torch.compile(flex_attention), create_block_mask), "torch.compile(flex_attention)"


def run_case(fn, q, k, v, backward: bool):
    if not backward:
        with torch.no_grad():
            return try_ms(lambda: fn(q, k, v))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    do = torch.randn_like(q)
    try:
        fn(*leaves).backward(do)
    except Exception as e:  # noqa: BLE001
        print(f"  failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return None
    return try_ms(lambda: fn(*leaves).backward(do), grad_to_none=leaves)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget", type=float, default=150.0, help="seconds; later cases are skipped")
    args = ap.parse_args()
    budget = Budget(args.budget)
    bw = copy_bandwidth()
    flex, flex_note = flex_peer()
    notes = [f"B*T = {TOKENS}, H = {H}, head dim {HEAD_DIM}, bf16, window W = keys per query (itself included). "
             f"Times in ms (median). Floor = bytes moved / measured copy bandwidth ({bw / 1e12:.2f} TB/s).",
             f"Peers: {flex_note} with a sliding-window block mask; SDPA (F.scaled_dot_product_attention) with a "
             f"boolean band mask (computes all T x T scores). flash-attn is not installed on this machine."]
    lines = header("Sliding-window attention (swa)", notes)
    cols = ["W", "T", "pass", "seqmix", "flex", "SDPA mask", "floor", "seqmix / flex", "seqmix / floor"]
    rows = []
    for W in WINDOWS:
        for T in TS:
            B = TOKENS // T
            q, k, v = (torch.randn(B, T, H, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, H, T, D] for the peers
            peers = {}
            if flex is not None and budget.ok():
                compiled, create_block_mask = flex
                mask = create_block_mask(lambda b, h, qi, ki: (ki <= qi) & (qi - ki < W), None, None, T, T)
                peers["flex"] = lambda a, b_, c, m=mask: compiled(a, b_, c, block_mask=m)
            if T <= 8192 and budget.ok():  # the boolean T x T mask and the dense scores grow as T^2
                band = torch.ones(T, T, device="cuda", dtype=torch.bool).tril_().triu_(-(W - 1))
                peers["sdpa"] = lambda a, b_, c, m=band: F.scaled_dot_product_attention(a, b_, c, attn_mask=m)
            for backward in (False, True):
                if not budget.ok():
                    rows.append([str(W), str(T), "fwd+bwd" if backward else "fwd"] + ["skipped (budget)"] * 6)
                    continue
                ms = run_case(lambda a, b_, c: swa_attn(a, b_, c, W), q, k, v, backward)
                peer_ms = {n: run_case(f, qh, kh, vh, backward) for n, f in peers.items()}
                floor = TOKENS * H * (BYTES_FWD + (BYTES_BWD if backward else 0)) / bw * 1e3
                rows.append([str(W), str(T), "fwd+bwd" if backward else "fwd", fmt(ms), fmt(peer_ms.get("flex")),
                             fmt(peer_ms.get("sdpa")), fmt(floor), ratio(ms, peer_ms.get("flex")), ratio(ms, floor)])
                print(" | ".join(rows[-1]), flush=True)
            del q, k, v, qh, kh, vh, peers
            torch.cuda.empty_cache()
            write(args.out, "swa.md", lines + table(cols, rows))
    lines += table(cols, rows) + [""]

    # error against the reference at a size the einsum reference handles
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2048, H, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for W in WINDOWS:
        err = (swa_attn(q, k, v, W).float() - swa_ref(q, k, v, W).float()).abs().max().item()
        lines.append(f"max |seqmix - swa_ref| at B=2, T=2048, W={W}, bf16: {err:.2e}")
    lines.append("")

    # launch-config sweep at T = 8k, W = 128
    if budget.ok():
        T, W = 8192, 128
        B = TOKENS // T
        q, k, v = (torch.randn(B, T, H, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = swa_attn(q, k, v, W).float()
        sweep_rows = []
        for cfg in (SwaConfig(64, 64, 4, 2), SwaConfig(64, 32, 4, 2), SwaConfig(128, 64, 8, 2),
                    SwaConfig(128, 32, 4, 2), SwaConfig(64, 64, 4, 3), SwaConfig(128, 64, 4, 3), SwaConfig(32, 32, 2, 2)):
            if not budget.ok():
                break
            fn = lambda: SwaAttnFunction.apply(q, k, v, W, HEAD_DIM**-0.5, (cfg, None))  # noqa: E731
            try:
                err = (fn().float() - ref).abs().max().item()
                ms = median_ms(fn)
            except Exception as e:  # noqa: BLE001
                print(f"  config {cfg} failed: {e}", flush=True)
                continue
            sweep_rows.append([f"{cfg.block_m}x{cfg.block_n}, {cfg.num_warps} warps, {cfg.num_stages} stages",
                               fmt(ms), f"{err:.1e}"])
        bwd_rows = []
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        do = torch.randn_like(q)
        for dkdv, dq in ((SwaConfig(64, 64, 4, 1), SwaConfig(64, 64, 4, 1)), (SwaConfig(64, 128, 8, 1),
                         SwaConfig(128, 64, 8, 1)), (SwaConfig(32, 64, 4, 1), SwaConfig(64, 32, 4, 1)),
                         (SwaConfig(64, 64, 4, 2), SwaConfig(64, 64, 4, 2)), (SwaConfig(128, 128, 8, 1),
                         SwaConfig(128, 128, 8, 1))):
            if not budget.ok():
                break
            cfgs = (None, (dkdv, dq))
            fn = lambda: SwaAttnFunction.apply(*leaves, W, HEAD_DIM**-0.5, cfgs).backward(do)  # noqa: E731
            ms = try_ms(fn, grad_to_none=leaves)
            bwd_rows.append([f"dkdv {dkdv.block_m}x{dkdv.block_n}/{dkdv.num_warps}w/{dkdv.num_stages}s, "
                             f"dq {dq.block_m}x{dq.block_n}/{dq.num_warps}w/{dq.num_stages}s", fmt(ms)])
        lines += ["## Launch configs at T = 8192, W = 128 (bf16)", ""]
        lines += table(["forward config (BM x BN, warps, stages)", "fwd ms", "max err vs default"], sweep_rows) + [""]
        lines += table(["backward configs", "fwd (default) + bwd ms"], bwd_rows) + [""]
    write(args.out, "swa.md", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
