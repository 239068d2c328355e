"""Benchmark of the Based Triton kernels against flash-linear-attention, SDPA and the hardware floor (one GPU run).

Shape of issue 4: B*T = 65,536 tokens, H = 16, F = 16, V = 64, bf16, T in {1k, 2k, 4k, 8k, 16k}; forward and
forward+backward, median of triton.testing.do_bench. Columns: seqmix `based_attn` (the quadratic form up to
common.PARALLEL_MAX_T, the chunked one beyond; with --autotune, the measured crossover), fla-core's `parallel_based`
and `fused_chunk_based` (when fla-core is importable), PyTorch SDPA causal at head dim 64 (same B, T, H), and the
floor = max(FLOPs / measured bf16 matmul rate, bytes / measured copy bandwidth), both measured in this run.
Counted per token and head, E = 1 + F + F^2, chunk C = 64 (causal: a query sees C/2 keys of its chunk on average):
    forward   FLOPs 4 E V + C (F + V)           bytes 2 (2F + 2V)              (q, k, v in; o out)
    backward  FLOPs 10 E V + 3 C (F + V)        bytes 2 (2F + 3V) + 2 (2F + V) (q, k, v, o, do in; dq, dk, dv out)
Also the decode step at the based-1b shape (H = 16, F = 16, V = 112, batch 256) against its bytes floor (the fp32
state read and written once), the split of the time between the kernels, and the error against
`based_linear_ref` at every benchmark size.

    python kernels/bench/bench_based.py --out based.md [--autotune]

--autotune first times one-phase changes of the launch configs (common.default_config) at T = 1k and 16k,
keeps those that win, and uses the result for every table (the chosen configs are printed); --warmup-only
compiles those variants on a small shape and exits (to fill Triton's cache while something else runs).
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform

import torch
import triton
from triton.testing import do_bench

from seqmix_based.kernels import based_attn, based_step
from seqmix_based.kernels.attn import BasedAttnFunction
from seqmix_based.kernels.attn_bwd import based_bwd
from seqmix_based.kernels.attn_fwd import based_fwd, chunk_states
from seqmix_based.kernels.common import KernelConfig, default_config
from seqmix_based.naive import based_linear_ref, based_step_ref

TOKENS, H, F, V = 65536, 16, 16, 64
TS = (1024, 2048, 4096, 8192, 16384)
TUNE_TS = (1024, 16384)  # the sizes --autotune and the time split look at
E = 1 + F + F * F
C = 64
PHASES = ("state", "out", "dstate", "dq", "dkv")
K = KernelConfig
CANDIDATES = {  # one-phase changes tried by --autotune (chunk 64); "chunk 128" changes every phase at once
    "state": [K(64, 32, 4, 2)],
    "dstate": [K(64, 16, 4, 2)],
    "out": [K(64, 64, 4, 2, 4), K(64, 64, 4, 2, 2)],
    "dq": [K(64, 64, 4, 2, 4)],
    "dkv": [K(64, 64, 4, 2, 4)],
}
CHUNK128 = {"state": K(128, 32, 8, 2), "out": K(128, 64, 8, 2, 2), "dstate": K(128, 16, 8, 2),
            "dq": K(128, 64, 8, 2, 2), "dkv": K(128, 64, 8, 2, 2)}
P_PHASES = ("pfwd", "pdq", "pdkv")
P_CANDIDATES = {  # the quadratic form: (rows per program, rows per inner step, warps, stages)
    "pfwd": [K(64, 64, 4, 3), K(128, 128, 8, 2)],
    "pdq": [K(64, 64, 4, 3)],
    "pdkv": [K(64, 64, 4, 3)],
}
P_TUNE_TS = (1024, 2048)


def seqmix_op(configs, form=None):
    """The op the tables time: the public function, or the autograd Function with explicit configs and form."""
    if configs is None and form is None:
        return lambda a, b, c: based_attn(a, b, c)[0]
    return lambda a, b, c: BasedAttnFunction.apply(a, b, c, None, None, False, 1e-12, configs, form)


def median_ms(fn, grad_to_none=None) -> float:
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def ceilings() -> tuple[float, float]:
    """(bf16 matmul FLOP/s, copy bytes/s) measured on random data."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    flops = 2 * 8192**3 / (median_ms(lambda: a @ b) * 1e-3)
    x = torch.randn(512 * 2**20, device="cuda")  # 2 GiB
    y = torch.empty_like(x)
    bw = 2 * x.numel() * 4 / (median_ms(lambda: y.copy_(x)) * 1e-3)
    return flops, bw


def floor_ms(T: int, rates: tuple[float, float], backward: bool) -> float:
    n = TOKENS * H
    flops = n * (4 * E * V + C * (F + V) + (10 * E * V + 3 * C * (F + V) if backward else 0))
    nbytes = n * 2 * ((2 * F + 2 * V) + ((2 * F + 3 * V) + (2 * F + V) if backward else 0))
    return max(flops / rates[0], nbytes / rates[1]) * 1e3


def fla_ops():
    try:
        from fla.ops.based import fused_chunk_based, parallel_based
    except Exception as e:  # noqa: BLE001 - fla-core is optional; say why it is missing
        return {}, f"fla-core not importable ({type(e).__name__}: {e})"
    import fla

    return {"fla parallel_based": parallel_based, "fla fused_chunk_based": fused_chunk_based}, \
        f"fla-core {getattr(fla, '__version__', '?')}"


def time_case(fn, args, backward: bool) -> float | None:
    try:
        if not backward:
            with torch.no_grad():
                return median_ms(lambda: fn(*args))
        leaves = [a.detach().requires_grad_() for a in args]
        out = fn(*leaves)
        do = torch.randn_like(out)
        return median_ms(lambda: fn(*leaves).backward(do), grad_to_none=leaves)
    except Exception as e:  # noqa: BLE001 - a peer that fails at a size gets n/a, the run goes on
        print(f"  failed: {type(e).__name__}: {str(e)[:200]}")
        return None


def fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def attn_table(rates, peers, backward: bool, configs, parallel_max_t) -> list[str]:
    name = "forward + backward" if backward else "forward"
    cols = ["seqmix"] + list(peers) + ["SDPA causal d64"]
    lines = [f"### {name} (ms, median)", "",
             "| T | B | " + " | ".join(cols) + " | floor | seqmix / fla best | seqmix / SDPA | seqmix / floor |",
             "|" + "---|" * (len(cols) + 6)]
    for T in TS:
        B = TOKENS // T
        q, k = (torch.randn(B, T, H, F, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
        qs, ks, vs = (torch.randn(B, H, T, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        form = None if parallel_max_t is None else ("parallel" if T <= parallel_max_t else "chunked")
        times = {"seqmix": time_case(seqmix_op(configs, form), (q, k, v), backward)}
        for pname, op in peers.items():
            times[pname] = time_case(op, (q, k, v), backward)
        sdpa = lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True)  # noqa: E731
        times["SDPA causal d64"] = time_case(sdpa, (qs, ks, vs), backward)
        fl = floor_ms(T, rates, backward)
        fla = [times[p] for p in peers if times[p] is not None]
        s = times["seqmix"]
        ratio = lambda a, b: "n/a" if a is None or not b else f"{a / b:.2f}"  # noqa: E731
        lines.append(f"| {T} | {B} | " + " | ".join(fmt(times[c]) for c in cols) + f" | {fl:.3f} | "
                     f"{ratio(s, min(fla) if fla else None)} | {ratio(s, times['SDPA causal d64'])} | {ratio(s, fl)} |")
        print(lines[-1], flush=True)
        del q, k, v, qs, ks, vs
        torch.cuda.empty_cache()
    return lines + [""]


def correctness(configs, parallel_max_t) -> list[str]:
    lines = ["### correctness at the benchmark sizes (bf16 kernel vs based_linear_ref in fp32)", "",
             "| T | o max abs err | o rel err | grads rel err (dq, dk, dv) |", "|---|---|---|---|"]
    for T in TS:
        B = TOKENS // T
        form = None if parallel_max_t is None else ("parallel" if T <= parallel_max_t else "chunked")
        g = torch.Generator(device="cuda").manual_seed(T)
        q, k = (torch.randn(B, T, H, F, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16, generator=g)
        grads = "-"
        if T == 2048:
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            o = seqmix_op(configs, form)(*leaves)
            do = torch.randn_like(o)
            got = torch.autograd.grad(o, leaves, do)
            ref_leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
            o_ref = based_linear_ref(*ref_leaves)[0]
            want = torch.autograd.grad(o_ref, ref_leaves, do.float())
            grads = ", ".join(f"{((a.float() - b).norm() / b.norm()).item():.1e}" for a, b in zip(got, want))
        else:
            with torch.no_grad():
                o, o_ref = seqmix_op(configs, form)(q, k, v), based_linear_ref(q, k, v)[0]
        with torch.no_grad():
            err = (o.float() - o_ref.float()).abs().max().item()
            rel = ((o.float() - o_ref.float()).norm() / o_ref.float().norm()).item()
        lines.append(f"| {T} ({form or 'auto'}) | {err:.2e} | {rel:.2e} | {grads} |")
        print(lines[-1], flush=True)
        torch.cuda.empty_cache()
    return lines + [""]


def decode(rates) -> list[str]:
    B, Hd, Fd, Vd = 256, 16, 16, 112
    Ed = 1 + Fd + Fd * Fd
    pre = [torch.randn(B, 8, Hd, d, device="cuda") for d in (Fd, Fd, Vd)]
    kv, z = based_linear_ref(*pre, output_final_state=True)[1]  # the state an 8-token prefill leaves
    q, k = (torch.randn(B, Hd, Fd, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, Hd, Vd, device="cuda", dtype=torch.bfloat16)
    ref_state = (kv.clone(), z.clone())
    o = based_step(q, k, v, (kv, z))
    o_ref = based_step_ref(q, k, v, ref_state)
    err = (o.float() - o_ref.float()).abs().max().item()
    state_err = (kv - ref_state[0]).abs().max().item()
    t = median_ms(lambda: based_step(q, k, v, (kv, z)))
    nbytes = 2 * (kv.numel() + z.numel()) * 4 + (2 * B * Hd * Fd + 2 * B * Hd * Vd) * 2
    fl = nbytes / rates[1] * 1e3
    return ["### decode step, based-1b shape (H=16, F=16, V=112), batch 256, bf16 inputs, fp32 state", "",
            "| time (ms) | bytes floor (ms) | time / floor | achieved GB/s | o max abs err | state max abs err |",
            "|---|---|---|---|---|---|",
            f"| {t:.4f} | {fl:.4f} | {t / fl:.2f} | {nbytes / t * 1e-6:.0f} | {err:.1e} | {state_err:.1e} |", ""]


def autotune(warmup_only: bool) -> tuple[list[str], dict[str, KernelConfig], int]:
    """Pick launch configs and the length up to which the quadratic form runs (instead of the chunked one).

    Each phase's candidates change that phase alone from the defaults and are kept when fwd + fwd+bwd time
    (summed over two lengths) drops by more than 2 %; chunked at T = 1k and 16k, quadratic at 1k and 2k.
    Then both forms with their picks at every T of the tables: the quadratic form stays up to the last T where
    it is faster forward and backward."""
    lines = ["### autotune (ms, median): one phase changed from the defaults, KernelConfig(chunk, block_v, "
             "num_warps, num_stages, chunks_per_program)", ""]

    def inputs_for(ts):
        return {T: [torch.randn(TOKENS // T if not warmup_only else 1, T, H, d, device="cuda",
                                dtype=torch.bfloat16) for d in (F, F, V)] for T in ts}

    def measure(cfgs, form, inputs):
        t = [time_case(seqmix_op(cfgs, form), inputs[T], bwd) for bwd in (False, True) for T in inputs]
        return t, (math.inf if None in t else sum(t))

    def row(label, t):
        lines.append(f"| {label} | " + " | ".join(fmt(x) for x in t) + " |")
        print(lines[-1], flush=True)

    def tune(form, phases, candidates, ts):
        inputs = inputs_for(ts if not warmup_only else (256,))
        base = {p: default_config(F, V, torch.bfloat16, p) for p in phases}
        if warmup_only:
            for cfgs in [base] + [{**base, p: c} for p, cands in candidates.items() for c in cands]:
                measure(cfgs, form, inputs)
            return base, inputs
        lines.extend([f"{form} form:", "", f"| variant | fwd T={ts[0]} | fwd T={ts[1]} | fwd+bwd T={ts[0]} | "
                      f"fwd+bwd T={ts[1]} |", "|---|---|---|---|---|"])
        t, base_score = measure(base, form, inputs)
        row("defaults", t)
        best = dict(base)
        for phase, cands in candidates.items():
            phase_best = base_score
            for cand in cands:
                t, score = measure({**base, phase: cand}, form, inputs)
                row(f"{phase} {tuple(cand)}", t)
                if score < 0.98 * phase_best:
                    best[phase], phase_best = cand, score
        t, combined = measure(best, form, inputs)
        row("combined", t)
        lines.append("")
        return best, inputs

    chunked, inputs = tune("chunked", PHASES, CANDIDATES, TUNE_TS)
    if warmup_only:
        measure(CHUNK128, "chunked", inputs)
    else:
        lines.pop()
        t, c128 = measure(CHUNK128, "chunked", inputs)
        row("chunk 128, all phases", t)
        if c128 < measure(chunked, "chunked", inputs)[1]:
            chunked = dict(CHUNK128)
        lines.append("")
    parallel, _ = tune("parallel", P_PHASES, P_CANDIDATES, P_TUNE_TS)
    configs = {**chunked, **parallel}
    if warmup_only:
        return [], configs, 0
    lines += ["crossover (ms, median; quadratic vs chunked form with the picks above):", "",
              "| T | fwd quadratic | fwd chunked | fwd+bwd quadratic | fwd+bwd chunked |", "|---|---|---|---|---|"]
    parallel_max_t = 0
    for i, T in enumerate(TS):
        x = [torch.randn(TOKENS // T, T, H, d, device="cuda", dtype=torch.bfloat16) for d in (F, F, V)]
        t = [time_case(seqmix_op(configs, form), x, bwd) for bwd in (False, True) for form in ("parallel", "chunked")]
        row(str(T), t)
        wins = None not in t and t[0] < t[1] and t[2] < t[3]
        if wins and parallel_max_t == (TS[i - 1] if i else 0):  # quadratic from T = TS[0] up to here
            parallel_max_t = T
    lines += ["", "chosen: " + ", ".join(f"{p} {tuple(configs[p])}" for p in PHASES + P_PHASES)
              + f"; quadratic form up to T = {parallel_max_t}", ""]
    print(lines[-2], flush=True)
    return lines, configs, parallel_max_t


def breakdown(configs) -> list[str]:
    """How the time splits between the kernels (forward state scan, the rest of the forward, the backward)."""
    lines = ["### time split of the chunked form (ms, median)", "",
             "| T | fwd state scan | fwd total | bwd total (with its state scan) |",
             "|---|---|---|---|"]
    cfg = {p: (configs or {}).get(p) or default_config(F, V, torch.bfloat16, p) for p in PHASES}
    for T in TUNE_TS:
        B = TOKENS // T
        q, k = (torch.randn(B, T, H, F, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
        t_state = median_ms(lambda: chunk_states(k, v, None, output_final_state=False, symmetrize=False,
                                                 config=cfg["state"]))
        fwd = lambda: based_fwd(q, k, v, None, output_final_state=False, store_r=True, eps=1e-12, configs=cfg)  # noqa
        t_fwd = median_ms(fwd)
        o, r, _ = fwd()
        do = torch.randn_like(o)
        t_bwd = median_ms(lambda: based_bwd(do, q, k, v, o, r, None, None, need_dinit=False, configs=cfg))
        lines.append(f"| {T} | {t_state:.3f} | {t_fwd:.3f} | {t_bwd:.3f} |")
        print(lines[-1], flush=True)
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the markdown tables here too")
    ap.add_argument("--autotune", action="store_true", help="pick launch configs first (see the module doc)")
    ap.add_argument("--warmup-only", action="store_true", help="compile the autotune variants and exit")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.warmup_only:
        autotune(warmup_only=True)
        return
    peers, fla_note = fla_ops()
    rates = ceilings()
    head = [f"## Based kernels: {torch.cuda.get_device_name()}, {datetime.date.today().isoformat()}", "",
            f"torch {torch.__version__}, triton {triton.__version__}, {fla_note}, python {platform.python_version()}. "
            f"B*T = {TOKENS}, H = {H}, F = {F}, V = {V}, bf16. Measured ceilings: bf16 matmul "
            f"{rates[0] / 1e12:.0f} TFLOP/s, copy {rates[1] / 1e9:.0f} GB/s (read + write).", ""]
    print("\n".join(head), flush=True)
    tuned, configs, parallel_max_t = autotune(False) if args.autotune else ([], None, None)
    out = head + tuned + attn_table(rates, peers, False, configs, parallel_max_t)
    out += attn_table(rates, peers, True, configs, parallel_max_t)
    out += breakdown(configs) + decode(rates) + correctness(configs, parallel_max_t)
    text = "\n".join(out)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
