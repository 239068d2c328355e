"""Mamba-1 selective scan and decode step: seqmix's Triton kernels vs mamba-ssm (when installed) and PyTorch.

Scan: B*T = 65,536 tokens, E = 2048 channels (mamba-360m's inner width), N = 16, bf16 activations (u, delta, z,
B, C as strided slices of their projections, as the mixer passes them), fp32 A, D, dt bias; the gate and the
softplus fused; T in {1k .. 16k}; forward and forward+backward (gradients of every input). Peers: mamba-ssm's CUDA
`selective_scan_fn` (channels-first, so with the transposes a [B, T, E] model needs) when it is installed, else the
figures measured on 2026-11-29 with mamba-ssm on an H200 (issue 16), marked as such; the chunked PyTorch reference
at one size (a few runs, it is slow). Floor: bytes moved at the copy bandwidth measured in this run.
Also: launch-config sweeps of the forward and backward, and the decode step at the mamba-1b shape
(E = 4096, N = 16), batch 1..256, eager and replayed from a CUDA graph, against its bytes floor.

    python kernels/bench/bench_mamba.py --out DIR [--budget SECONDS]
"""
from __future__ import annotations

import argparse
import time

import torch

from benchlib import TOKENS, TS, Budget, copy_bandwidth, fmt, header, median_ms, ratio, table, try_ms, write
from seqmix_mamba.kernel import default_configs, selective_scan, selective_state_update
from seqmix_mamba.naive import selective_scan_chunked, selective_state_update_ref

E, N, R = 2048, 16, 64
MEASURED = {2048: (2.30, 11.9), 8192: (2.52, 12.4)}  # mamba-ssm CUDA on an H200, 2026-11-29 (issue 16): fwd, fwd+bwd


def scan_inputs(B, T, e=E, n=N, r=R):
    """u, delta, A, B, C, D, z, bias; u | z and dt | B | C as slices of one projection each (the mixer's layout)."""
    dev, bf = "cuda", torch.bfloat16
    xz = torch.randn(B, T, 2 * e, device=dev, dtype=bf)
    proj = torch.randn(B, T, r + 2 * n, device=dev, dtype=bf)
    delta = (torch.randn(B, T, e, device=dev) * 0.5 - 3.0).to(bf)
    A = -torch.arange(1, n + 1, device=dev, dtype=torch.float32).repeat(e, 1)
    D = torch.ones(e, device=dev)
    bias = torch.rand(e, device=dev) - 4.0
    return [xz[..., :e], delta, A, proj[..., r:r + n], proj[..., r + n:], D, xz[..., e:], bias]


def mamba_ssm_peer():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as e:  # noqa: BLE001 - optional
        return None, f"mamba-ssm not installed ({type(e).__name__}): its column is the issue's measured figures"

    def run(u, delta, A, Bm, Cm, D, z, bias):
        y = selective_scan_fn(u.transpose(1, 2), delta.transpose(1, 2), A, Bm.transpose(1, 2), Cm.transpose(1, 2),
                              D, z.transpose(1, 2), bias, delta_softplus=True)
        return y.transpose(1, 2)
    return run, "mamba-ssm selective_scan_fn (CUDA), measured in this run"


def ours(configs=None):
    return lambda *a: selective_scan(*a, configs=configs)[0]


def time_scan(fn, inputs, backward: bool):
    if not backward:
        with torch.no_grad():
            return try_ms(lambda: fn(*inputs))
    leaves = [t.detach().requires_grad_() for t in inputs]
    dy = torch.randn_like(fn(*leaves))
    return try_ms(lambda: fn(*leaves).backward(dy), grad_to_none=leaves)


def few_runs_ms(fn, reps: int = 3) -> float:
    """Mean of `reps` timed calls after one warm call (for the slow reference)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def scan_table(budget, bw, peer, peer_note, lines, out):
    cols = ["T", "B", "pass", "seqmix triton", "segments=1", "mamba-ssm", "floor", "seqmix / mamba-ssm",
            "seqmix / floor"]
    rows = []
    for T in TS:
        B = TOKENS // T
        ins = scan_inputs(B, T)
        f, b = default_configs(torch.device("cuda"), B, E)
        one = (f._replace(segments=1), b._replace(segments=1))
        for backward in (False, True):
            pas = "fwd+bwd" if backward else "fwd"
            if not budget.ok():
                rows.append([str(T), str(B), pas] + ["skipped (budget)"] * 6)
                continue
            ms = time_scan(ours(), ins, backward)
            ms1 = time_scan(ours(one), ins, backward)
            if peer is not None:
                pm, mark = time_scan(peer, ins, backward), ""
            else:
                pm, mark = (MEASURED.get(T, (None, None))[backward], " (issue)") if T in MEASURED else (None, "")
            # fwd: u, delta, z read, y written (bf16); bwd adds dy read, du, d delta, dz written, u delta z re-read
            floor = TOKENS * E * 2 * (4 + (7 if backward else 0)) / bw * 1e3
            rows.append([str(T), str(B), pas, fmt(ms), fmt(ms1), fmt(pm) + mark, fmt(floor), ratio(ms, pm),
                         ratio(ms, floor)])
            print(" | ".join(rows[-1]), flush=True)
        del ins
        write(out, "mamba.md", lines + table(cols, rows))
    return table(cols, rows)


def sweep_table(budget, lines, out):
    """Forward and forward+backward under other launch configs than the defaults, at T = 2k and 16k."""
    rows = []
    for T in (2048, 16384):
        f0, b0 = default_configs(torch.device("cuda"), TOKENS // T, E)
        other = 64 if f0.block_e == 128 else 128
        cands = [("fwd", f0._replace(block_e=32, num_warps=1)), ("fwd", f0._replace(block_e=other)),
                 ("fwd", f0._replace(block_e=128, num_warps=4)), ("fwd", f0._replace(maxnreg=128)),
                 ("fwd", f0._replace(maxnreg=96)), ("bwd", b0._replace(block_e=16)), ("bwd", b0._replace(maxnreg=168)),
                 ("bwd", b0._replace(maxnreg=128)), ("chunk", 8), ("chunk", 32)]
        ins = scan_inputs(TOKENS // T, T)
        for kind, c in cands:
            if not budget.ok():
                break
            if kind == "fwd":
                cfgs, bw_ = (c, b0), False
            elif kind == "bwd":
                cfgs, bw_ = (f0, c), True
            else:
                cfgs, bw_ = (f0._replace(chunk=c), b0), True
            ms = time_scan(ours(cfgs), ins, bw_)
            rows.append([str(T), kind, str(c), "fwd+bwd" if bw_ else "fwd", fmt(ms)])
            print(" | ".join(rows[-1]), flush=True)
        del ins
    return table(["T", "varied", "config", "pass", "ms"], rows)


def decode_table(budget, bw):
    """mamba-1b's scan step: E = 4096, N = 16; u, delta, z bf16 [B, E]; state fp32 [B, E, N] in place. The graph
    replays 16 steps over 16 different states (as 16 layers would), so large batches read them from HBM."""
    e = 4096
    rows = []
    for Bd in (1, 8, 32, 128, 256):
        if not budget.ok():
            rows.append([str(Bd)] + ["skipped (budget)"] * 6)
            continue
        u, delta, A, Bm, Cm, D, z, bias = [t[:, 0] if t.dim() == 3 else t for t in scan_inputs(Bd, 1, e)]
        states = [torch.randn(Bd, e, N, device="cuda") for _ in range(16)]  # 16 layers' states: > L2 at batch 32+
        args = (u, delta, A, Bm, Cm, D, z, bias)
        with torch.no_grad():
            eager = try_ms(lambda: selective_state_update(states[0], *args))
            ref = try_ms(lambda: selective_state_update_ref(states[0], *args))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for st in states:
                    selective_state_update(st, *args)
            replay = median_ms(graph.replay) / len(states)
        floor = (Bd * e * N * 4 * 2 + e * N * 4 + Bd * e * 2 * 4 + e * 4 * 2) / bw * 1e3
        rows.append([str(Bd), fmt(eager and eager * 1e3, 1), fmt(replay * 1e3, 1), fmt(ref and ref * 1e3, 1),
                     fmt(floor * 1e3, 2), ratio(replay, floor), ratio(eager, floor)])
        print(" | ".join(rows[-1]), flush=True)
    return table(["batch", "seqmix step (us)", "in a CUDA graph (us/step)", "PyTorch reference (us)",
                  "bytes floor (us)", "graph / floor", "eager / floor"], rows)


def reference_row(budget):
    """The chunked PyTorch scan (the mixer's impl=chunked) at T = 2048, a quarter of the tokens (memory)."""
    if not budget.ok():
        return ["skipped (budget)"]
    T, B = 2048, TOKENS // 2048 // 4
    u, delta, A, Bm, Cm, D, z, bias = scan_inputs(B, T)
    dt = torch.nn.functional.softplus(delta.float() + bias)
    with torch.no_grad():
        try:
            ref = few_runs_ms(lambda: selective_scan_chunked(u.float(), dt, A, Bm, Cm, D, chunk_size=64), reps=2)
        except torch.OutOfMemoryError:
            return ["OOM"]
        mine = median_ms(lambda: selective_scan(u, delta, A, Bm, Cm, D, z, bias))
    return [f"B={B}, T={T}: chunked PyTorch forward {ref:.1f} ms, seqmix triton {mine:.3f} ms "
            f"({ref / mine:.0f}x)"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget", type=float, default=120.0)
    args = ap.parse_args()
    budget = Budget(args.budget)
    bw = copy_bandwidth()
    peer, peer_note = mamba_ssm_peer()
    f, b = default_configs(torch.device("cuda"), TOKENS // 2048, E)
    fw = default_configs(torch.device("cuda"), TOKENS // 16384, E)[0]
    lines = header("Mamba selective scan and decode step", [
        f"Scan: E = {E}, N = {N}, bf16 activations, B*T = {TOKENS}, gate and softplus fused; times in ms (median, "
        f"triton.testing.do_bench). seqmix default configs (block_e, warps, chunk, segments; segments None = from "
        f"the SM count): forward {tuple(f)} ({tuple(fw)} when the batch is small), backward {tuple(b)}; "
        f"`segments=1` disables the time split. {peer_note}. "
        f"Floor = bytes moved / measured copy bandwidth ({bw / 1e12:.2f} TB/s)."])
    lines += ["## Selective scan", ""] + scan_table(budget, bw, peer, peer_note, lines, args.out) + [""]
    write(args.out, "mamba.md", lines)
    lines += ["## Decode step, mamba-1b (E = 4096, N = 16)", ""] + decode_table(budget, bw) + [""]
    write(args.out, "mamba.md", lines)
    lines += ["## PyTorch reference scan", ""] + reference_row(budget) + [""]
    write(args.out, "mamba.md", lines)
    lines += ["## Launch-config sweep", ""] + sweep_table(budget, lines, args.out) + [""]
    write(args.out, "mamba.md", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
