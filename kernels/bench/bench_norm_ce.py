"""RMSNorm + residual, rotary and the LM-head cross-entropy: seqmix vs eager PyTorch and torch.compile'd PyTorch.

B * T = 65,536 tokens, bf16 activations, fp32 residual stream, d = H * head dim = 1024. RMSNorm and the
cross-entropy are per token, so T does not change them (one row each); rotary is timed at every T
(q [B, T, 16, 64] a strided slice of a fused qkv projection). Floors: bytes moved at the copy bandwidth
measured in this run. Cross-entropy: vocabulary 50,257 padded to 50,264, tied head, T = 8k (B = 8); forward +
backward time and peak memory above the inputs (torch.cuda.max_memory_allocated).

    python kernels/bench/bench_norm_ce.py --out DIR [--budget SECONDS]
"""
from __future__ import annotations

import argparse

import torch

from benchlib import HEAD_DIM, TOKENS, TS, H, Budget, copy_bandwidth, fmt, header, ratio, table, try_ms, write
from seqmix_kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from seqmix_kernels.cross_entropy.triton import linear_cross_entropy as triton_cross_entropy
from seqmix_kernels.rmsnorm import rms_norm_residual_ref
from seqmix_kernels.rotary import rotary_ref
from seqmix_kernels.rmsnorm.triton import rms_norm_residual
from seqmix_kernels.rotary.triton import rotary

D = H * HEAD_DIM
VOCAB, VOCAB_PAD = 50257, 50264


def time_op(fn, inputs, grad_mask, backward: bool):
    """Median ms of fn(*inputs), or of forward + backward through every output with random cotangents."""
    if not backward:
        with torch.no_grad():
            return try_ms(lambda: fn(*inputs))
    leaves = [t.detach().requires_grad_(m) for t, m in zip(inputs, grad_mask)]

    def outputs():
        out = fn(*leaves)
        return out if isinstance(out, tuple) else (out,)

    cots = [torch.randn_like(o) for o in outputs()]
    return try_ms(lambda: torch.autograd.backward(outputs(), cots),
                  grad_to_none=[t for t, m in zip(leaves, grad_mask) if m])


def norm_section(bw, budget) -> list[str]:
    x = torch.randn(TOKENS, D, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(TOKENS, D, device="cuda")
    w = torch.ones(D, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(rms_norm_residual_ref)
    rows = []
    for backward in (False, True):
        if not budget.ok():
            break
        args = ((x, res, w), (True, True, True), backward)
        ms = time_op(rms_norm_residual, *args)
        eager = time_op(rms_norm_residual_ref, *args)
        comp = time_op(compiled, *args)
        per_elem = 12 + (16 if backward else 0)  # fwd: x 2 + res 4 in, res 4 + y 2 out; bwd: dy 2 + r 4 + dr 4 in,
        floor = TOKENS * D * per_elem / bw * 1e3  # dres 4 + dx 2 out
        rows.append(["fwd+bwd" if backward else "fwd", fmt(ms), fmt(eager), fmt(comp), fmt(floor), ratio(ms, eager),
                     ratio(ms, comp), ratio(ms, floor)])
        print(" | ".join(rows[-1]), flush=True)
    return [f"## RMSNorm + residual add ({TOKENS} x {D}, x bf16, residual fp32)", ""] + table(
        ["pass", "seqmix", "eager", "compiled", "floor", "vs eager", "vs compiled", "vs floor"], rows) + [""]


def rotary_section(bw, budget) -> list[str]:
    compiled = torch.compile(rotary_ref, dynamic=True)
    rows = []
    for T in TS:
        B = TOKENS // T
        qkv = torch.randn(B, T, 3, H, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        for backward in (False, True):
            if not budget.ok():
                rows.append([str(T), "fwd+bwd" if backward else "fwd"] + ["skipped (budget)"] * 6)
                continue
            args = ((qkv[:, :, 0],), (True,), backward)
            ms = time_op(rotary, *args)
            eager = time_op(rotary_ref, *args)
            comp = time_op(compiled, *args)
            floor = TOKENS * H * HEAD_DIM * 2 * (2 + (2 if backward else 0)) / bw * 1e3
            rows.append([str(T), "fwd+bwd" if backward else "fwd", fmt(ms), fmt(eager), fmt(comp), fmt(floor),
                         ratio(ms, comp), ratio(ms, floor)])
            print(" | ".join(rows[-1]), flush=True)
        del qkv
    return [f"## Rotary (q [B, T, {H}, {HEAD_DIM}] bf16, a strided slice of qkv; full head dim rotated)", ""] + table(
        ["T", "pass", "seqmix", "eager", "compiled", "floor", "vs compiled", "vs floor"], rows) + [""]


def ce_section(budget, flush) -> list[str]:
    T = 8192
    B = TOKENS // T
    torch.manual_seed(0)
    h = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
    wt = (torch.randn(VOCAB_PAD, D, device="cuda") * 0.02).to(torch.bfloat16)
    tgt = torch.randint(0, VOCAB, (B, T), device="cuda")
    compiled = torch.compile(linear_cross_entropy_ref)
    peers = {"seqmix triton": lambda a, b: triton_cross_entropy(a, b, tgt, vocab_size=VOCAB),
             "seqmix chunked": lambda a, b: linear_cross_entropy(a, b, tgt, vocab_size=VOCAB),
             "eager": lambda a, b: linear_cross_entropy_ref(a, b, tgt, vocab_size=VOCAB),
             "compiled": lambda a, b: compiled(a, b, tgt, vocab_size=VOCAB)}
    rows, results = [], {}
    for name, fn in peers.items():
        if not budget.ok():
            rows.append([name, "skipped (budget)", "", "", ""])
            continue
        a, b = h.detach().requires_grad_(), wt.detach().requires_grad_()
        try:
            fn(a, b).backward()  # warm-up (and compile)
            a.grad = b.grad = None
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            loss = fn(a, b)
            loss.backward()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            fwd = try_ms(lambda: fn(h, wt))
            ms = try_ms(lambda: fn(a, b).backward(), grad_to_none=[a, b])
            results[name] = (loss.item(), a.grad.float(), ms, peak)
        except Exception as e:  # noqa: BLE001
            print(f"  {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append([name, "failed", "", "", ""])
            continue
        finally:
            a.grad = b.grad = None
            torch.cuda.empty_cache()
        rows.append([name, fmt(fwd), fmt(ms), f"{peak:.2f}", f"{loss.item():.6f}"])
        print(" | ".join(rows[-1]), flush=True)
        flush(table(["impl", "forward ms (no grad)", "fwd+bwd ms", "peak GiB above inputs", "loss"], rows))
    lines = [f"## LM-head cross-entropy (B = {B}, T = {T}, d = {D}, vocab {VOCAB} padded to {VOCAB_PAD}, bf16)", ""]
    lines += table(["impl", "forward ms (no grad)", "fwd+bwd ms", "peak GiB above inputs", "loss"], rows) + [""]
    for mine in ("seqmix triton", "seqmix chunked"):
        if mine in results and "eager" in results:
            s, e = results[mine], results["eager"]
            err = ((s[1] - e[1]).abs().max() / e[1].abs().max()).item()
            vs_c = f", time vs compiled {ratio(s[2], results['compiled'][2])}" if "compiled" in results else ""
            lines += [f"{mine} / eager: time {ratio(s[2], e[2])}{vs_c}, peak memory {s[3] / e[3]:.3f}x; "
                      f"d h normalised max difference {err:.2e}", ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget", type=float, default=90.0)
    ap.add_argument("--sections", nargs="+", default=["norm", "rotary", "ce"], choices=["norm", "rotary", "ce"])
    args = ap.parse_args()
    budget = Budget(args.budget)
    bw = copy_bandwidth()
    lines = header("RMSNorm + residual, rotary, LM-head cross-entropy", [
        f"B*T = {TOKENS}, d = {D}. Times in ms (median). Floor = bytes moved / measured copy bandwidth "
        f"({bw / 1e12:.2f} TB/s)."])
    for name, section in (("norm", norm_section), ("rotary", rotary_section)):
        if name in args.sections:
            lines += section(bw, budget)
            write(args.out, "norm_ce.md", lines)
    if "ce" in args.sections:
        def flush(part):
            write(args.out, "norm_ce.md", lines + ["## LM-head cross-entropy"] + part)

        lines += ce_section(budget, flush)
    write(args.out, "norm_ce.md", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
