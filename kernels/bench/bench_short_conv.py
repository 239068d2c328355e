"""Gated short convolution: seqmix's fused kernel (conv + SiLU + gate) vs PyTorch's conv1d (+ causal-conv1d).

BaseConv's conv at d_model = H * head dim = 1024: C = 2 * d = 2048 channels, kernel 3, x and the gate the two
halves of one [B, T, 2C] projection, bf16, B * T = 65,536 tokens, T in {1k .. 16k}; forward and forward+backward.
Peers: eager `silu(conv1d(x)) * gate` (channels-first, with the transposes a [B, T, C] model needs), the bare
depthwise conv1d on a channels-first tensor (no transposes, no SiLU, no gate: a lower bound for PyTorch), and
causal-conv1d's `causal_conv1d_fn` (+ gate in PyTorch) when it is installed. Floor: bytes moved (forward x, gate
read, y written; backward adds dy read and dx, d gate written) at the copy bandwidth measured in this run.
Also K = 4 with a bias (Mamba's conv, no gate) and the decode step (batch 256, based-1b's C = 3584).

    python kernels/bench/bench_short_conv.py --out DIR [--budget SECONDS]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchlib import HEAD_DIM, TOKENS, TS, H, Budget, copy_bandwidth, fmt, header, ratio, table, try_ms, write
from seqmix_kernels.short_conv import short_conv_step_ref
from seqmix_kernels.short_conv.triton import short_conv, short_conv_step

C = 2 * H * HEAD_DIM


def eager_gated(x, w, g):
    K, T = w.shape[1], x.shape[1]
    y = F.conv1d(x.transpose(1, 2), w[:, None], padding=K - 1, groups=w.shape[0])[..., :T]
    return F.silu(y).transpose(1, 2) * g


def causal_conv1d_peer():
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception as e:  # noqa: BLE001 - optional
        return None, f"causal-conv1d not installed ({type(e).__name__})"
    return (lambda x, w, g: causal_conv1d_fn(x.transpose(1, 2), w, activation="silu").transpose(1, 2) * g), \
        "causal-conv1d"


def time_op(fn, inputs, backward: bool):
    if not backward:
        with torch.no_grad():
            return try_ms(lambda: fn(*inputs))
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    dy = torch.randn_like(out)
    return try_ms(lambda: fn(*leaves).backward(dy), grad_to_none=leaves)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget", type=float, default=60.0)
    args = ap.parse_args()
    budget = Budget(args.budget)
    bw = copy_bandwidth()
    ccd, ccd_note = causal_conv1d_peer()
    lines = header("Short convolution (conv, mamba)", [
        f"C = {C} channels (BaseConv at d = {H * HEAD_DIM}), K = 3, bf16, B*T = {TOKENS}. Times in ms (median). "
        f"Floor = bytes moved / measured copy bandwidth ({bw / 1e12:.2f} TB/s). {ccd_note}."])
    cols = ["T", "pass", "seqmix fused", "eager conv1d+silu*gate", "bare conv1d", "causal-conv1d+gate", "floor",
            "seqmix / eager", "seqmix / floor"]
    rows = []
    w = (torch.randn(C, 3, device="cuda") / 3**0.5).to(torch.bfloat16)
    for T in TS:
        B = TOKENS // T
        xg = torch.randn(B, T, 2 * C, device="cuda", dtype=torch.bfloat16)
        x, g = xg.chunk(2, -1)
        x_cf = torch.randn(B, C, T, device="cuda", dtype=torch.bfloat16)
        for backward in (False, True):
            if not budget.ok():
                rows.append([str(T), "fwd+bwd" if backward else "fwd"] + ["skipped (budget)"] * 7)
                continue
            ms = time_op(lambda a, b, c: short_conv(a, b, activation="silu", gate_BTC=c)[0], (x, w, g), backward)
            eager = time_op(eager_gated, (x, w, g), backward)
            bare = time_op(lambda a, b: F.conv1d(a, b[:, None], padding=2, groups=C)[..., :T], (x_cf, w), backward)
            peer = time_op(ccd, (x, w, g), backward) if ccd is not None else None
            floor = TOKENS * C * 2 * (3 + (5 if backward else 0)) / bw * 1e3
            rows.append([str(T), "fwd+bwd" if backward else "fwd", fmt(ms), fmt(eager), fmt(bare), fmt(peer),
                         fmt(floor), ratio(ms, eager), ratio(ms, floor)])
            print(" | ".join(rows[-1]), flush=True)
        del xg, x, g, x_cf
        write(args.out, "short_conv.md", lines + table(cols, rows))
    lines += table(cols, rows) + [""]

    # Mamba's conv: K = 4, bias, SiLU, no gate, T = 4096 (E = 2 * d = 2048 channels)
    if budget.ok():
        T = 4096
        x = torch.randn(TOKENS // T, T, 2 * C, device="cuda", dtype=torch.bfloat16)[..., :C]
        w4 = (torch.randn(C, 4, device="cuda") / 2).to(torch.bfloat16)
        b4 = torch.randn(C, device="cuda", dtype=torch.bfloat16)
        mrows = []
        for backward in (False, True):
            ms = time_op(lambda a, b, c: short_conv(a, b, c, activation="silu")[0], (x, w4, b4), backward)
            floor = TOKENS * C * 2 * (2 + (3 if backward else 0)) / bw * 1e3
            mrows.append(["fwd+bwd" if backward else "fwd", fmt(ms), fmt(floor), ratio(ms, floor)])
        lines += [f"## K = 4 + bias + SiLU, no gate (Mamba), T = {T}", ""]
        lines += table(["pass", "seqmix", "floor", "seqmix / floor"], mrows) + [""]

    # decode step: batch 256, C = 3584 (based-1b), K = 3, gate; state bf16 read + written, x, gate read, y written
    if budget.ok():
        Bd, Cd = 256, 3584
        st = torch.randn(Bd, Cd, 3, device="cuda", dtype=torch.bfloat16)
        xd, gd = (torch.randn(Bd, Cd, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        wd = torch.randn(Cd, 3, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ms = try_ms(lambda: short_conv_step(xd, st, wd, activation="silu", gate_BC=gd))
            ref = try_ms(lambda: short_conv_step_ref(xd, st, wd, activation="silu", gate_BC=gd))
        floor = Bd * Cd * 2 * (2 * 3 + 3) / bw * 1e3
        lines += [f"## Decode step, batch {Bd}, C = {Cd}, K = 3 (one launch; floor {floor * 1e3:.1f} us, "
                  f"launch latency dominates)", ""]
        lines += table(["seqmix step (us)", "PyTorch reference step (us)"],
                       [[fmt(ms and ms * 1e3, 1), fmt(ref and ref * 1e3, 1)]]) + [""]
    write(args.out, "short_conv.md", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
