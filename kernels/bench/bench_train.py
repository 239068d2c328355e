"""Training throughput side by side on one GPU: seqmix recipes through the DeepSpeed engine of `recipes/pretrain.py`
(or a plain loop, to price the engine), next to transformers' LlamaForCausalLM of the attn-360m shape, each row
with a torch.profiler summary of its step. Synthetic tokens; a markdown table on stdout.

    python kernels/bench/bench_train.py --out DIR                          # H200: the issue-15 table
    python kernels/bench/bench_train.py --recipes based-360m --seq-lens 2048 --engines ds0 ds1 ds2 plain --llama
    python kernels/bench/bench_train.py --recipes attn-360m --seq-lens 2048 --compile off on --llama eager

Rows: every (seq len, recipe, engine, compile) plus every (seq len, Llama variant); a micro batch of
tokens_per_step / seq_len sequences, no accumulation; the mean of `--steps` timed steps after `--warmup`
untimed ones (compilation happens there). Engines: ds0/ds1/ds2 = DeepSpeed with that ZeRO stage (bf16 weights,
fp32 masters in its optimizer, clipping 1.0), plain = seqmix.train.plain.PlainTrainer (the same arithmetic,
no engine). Llama variants: eager (fp32 weights + bf16 autocast), compiled (the same, torch.compile'd per
decoder layer and head + loss), compiled-bf16 (bf16 weights); fused AdamW and clipping 1.0 in a plain loop.
MFU = tokens/s x 3 x causal forward FLOPs per token (trainlib.causal_flops_per_token: attention counts half the
full T x T) / the dense bf16 peak (989 TFLOP/s on an H200). Profile: 2 steps under a CUDA-only profiler.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[2]


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs seqmix rows only (a check of the script)


def _batch(seq_len: int, micro: int, vocab: int):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randint(0, vocab, (micro, seq_len + 1), device=DEVICE, generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def seqmix_step(name: str, seq_len: int, micro: int, engine: str, compile_: bool):
    """(step fn, the HybridLM, row fields) for a seqmix recipe under `engine`."""
    from seqmix.tokenizer import tokenizer_vocab_size
    from seqmix.train.loop import build_engine, model_config
    from seqmix.train.schema import find_recipe, load_recipe

    stage = {"ds0": 0, "ds1": 1, "ds2": 2, "plain": 1}[engine]
    recipe = load_recipe(find_recipe(name, [ROOT / "recipes"]), [
        f"data.seq_len={seq_len}", "data.source=synthetic", f"train.micro_batch={micro}",
        f"train.global_batch={micro}", "optim.warmup_steps=0", f"zero.stage={stage}",
        f"train.compile={str(compile_).lower()}"])
    vocab = tokenizer_vocab_size(recipe.data.tokenizer)
    if engine == "plain":
        from seqmix.model import build_model
        from seqmix.train.plain import PlainTrainer

        torch.manual_seed(recipe.train.seed)
        lm = build_model(model_config(recipe, vocab)).to(DEVICE)
        lm = lm.bfloat16() if recipe.train.dtype == "bf16" else lm
        if compile_:
            lm.compile_blocks()
        o = recipe.optim
        trainer = PlainTrainer(lm, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                               grad_clip=o.grad_clip)
        x, y = _batch(seq_len, micro, lm.config.vocab_size)
        return (lambda: trainer.step(lambda: lm.loss(x, y))), lm, {"params": lm.num_params()}
    built = build_engine(recipe, vocab, 1, DEVICE)
    eng, lm = built.engine, built.lm
    x, y = _batch(seq_len, micro, lm.config.vocab_size)

    def step():
        loss = eng(x, y)
        eng.backward(loss)
        eng.step()
        return loss.detach()

    return step, lm, {"params": built.num_params}


def run_row(row: dict, args, flops_of) -> dict:
    from trainlib import llama_like, llama_step, peak_bf16_flops, profile_steps, time_steps

    seq, micro = row["seq_len"], row["micro_batch"]
    state = {}
    try:
        if row["kind"] == "seqmix":
            step, lm, extra = seqmix_step(row["recipe"], seq, micro, row["engine"], row["compile"])
            row.update(extra)
            fpt = flops_of(row["recipe"], seq)
        else:
            from seqmix.config import resolve_model

            cfg = resolve_model("attn-360m")
            model = llama_like(cfg, num_layers=24, hidden=2816)
            row["params"] = sum(p.numel() for p in model.parameters())
            x, y = _batch(seq, micro, cfg.vocab_size)
            step = llama_step(model, row["variant"], x, y)
            fpt = flops_of("attn-360m", seq)
        state["step"] = step
        cuda = DEVICE == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        row.update(time_steps(step, args.steps, args.warmup, args.max_seconds))
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        row["tokens_per_s"] = micro * seq / row["step_s"]
        peak = peak_bf16_flops() if cuda else None
        row["mfu"] = row["tokens_per_s"] * 3 * fpt / peak if peak else None
        if args.profile_steps and cuda:
            try:
                row.update(profile_steps(step, args.profile_steps))
            except Exception as e:  # a profiler failure must not lose the timing
                row["profile_error"] = f"{type(e).__name__}: {e}"
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        traceback.print_exc()
    finally:
        state.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    return row


def _label(r: dict) -> str:
    if r["kind"] == "seqmix":
        eng = {"ds0": "DeepSpeed ZeRO-0", "ds1": "DeepSpeed ZeRO-1", "ds2": "DeepSpeed ZeRO-2", "plain": "plain loop"}
        return f"seqmix {r['recipe']}, {eng[r['engine']]}, {'compiled' if r['compile'] else 'eager'}"
    return {"eager": "transformers Llama, fp32 + bf16 autocast, eager",
            "compiled": "transformers Llama, fp32 + bf16 autocast, compiled",
            "compiled-bf16": "transformers Llama, bf16 weights, compiled"}[r["variant"]]


def markdown(rows: list[dict], device_name: str) -> str:
    head = ("| run | seq | micro | params | steps | step (ms) | tokens/s | vs best Llama | MFU | peak GiB | "
            "launches/step | GEMM | mixer kernels | other kernels | idle |")
    out = [f"Training throughput on {device_name} (synthetic tokens, one device, bf16)", "", head,
           "|" + "---|" * (head.count("|") - 1)]
    best = {}
    for r in rows:
        if r["kind"] == "llama" and "tokens_per_s" in r:
            best[r["seq_len"]] = max(best.get(r["seq_len"], 0), r["tokens_per_s"])
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for r in rows:
        lead = f"| {_label(r)} | {r['seq_len']} | {r['micro_batch']} | {r.get('params', 0):,} |"
        if "error" in r:
            out.append(lead + f" - | {r['error']} |" + " - |" * 9)
            continue
        vs = f"{r['tokens_per_s'] / best[r['seq_len']]:.2f}x" if best.get(r["seq_len"]) else "-"
        prof = (f" {r['launches_per_step']:,.0f} | {pct(r['gemm_share'])} | {pct(r['mixer_share'])} | "
                f"{pct(r['other_share'])} | {pct(r['idle_share'])} |") if "launches_per_step" in r else " - |" * 5
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        out.append(lead + f" {r['timed_steps']} | {1e3 * r['step_s']:.1f} | {r['tokens_per_s']:,.0f} | {vs} | "
                   f"{pct(r['mfu'])} | {mem} |" + prof)
    details = [r for r in rows if r.get("top_kernels")]
    if details:
        out += ["", "Top device kernels per row (by time per step; name, launches per step, ms per step):", ""]
        for r in details:
            tops = "; ".join(f"{k['name']} ({k['per_step']:.0f}, {k['ms_per_step']:.1f})" for k in r["top_kernels"][:8])
            out.append(f"- {_label(r)} @ {r['seq_len']}: {tops}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", nargs="*", default=["based-360m", "attn-360m"], help="seqmix recipe names")
    ap.add_argument("--seq-lens", nargs="+", type=int, default=[2048, 8192])
    ap.add_argument("--tokens-per-step", type=int, default=65536, help="micro batch = this / seq_len sequences")
    ap.add_argument("--row-tokens", nargs="*", default=["llama-eager=32768", "llama-compiled=32768"],
                    metavar="KEY=TOKENS", help="tokens per step for some rows (llama-<variant> or a recipe): the "
                    "fp32-weight Llama variants hold fp32 logits, 65536 tokens of them may not fit")
    ap.add_argument("--engines", nargs="+", default=["ds1"], choices=["ds0", "ds1", "ds2", "plain"])
    ap.add_argument("--engines-at", type=int, default=None,
                    help="run the extra --engines only at this seq len and for the first recipe (default: all)")
    ap.add_argument("--compile", nargs="+", default=["on"], choices=["on", "off"], help="seqmix rows")
    ap.add_argument("--llama", nargs="*", default=["eager", "compiled", "compiled-bf16"],
                    choices=["eager", "compiled", "compiled-bf16"], help="Llama peer variants (none: no peer)")
    ap.add_argument("--llama-at-long", nargs="*", default=["eager", "compiled-bf16"],
                    help="the Llama variants for seq lens above 2048")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    ap.add_argument("--max-seconds", type=float, default=20.0, help="stop timing a row after this long")
    ap.add_argument("--profile-steps", type=int, default=2, help="steps under the profiler per row (0: none)")
    ap.add_argument("--out", default=None, help="folder for train.json and train.md (written after every row)")
    args = ap.parse_args(argv)

    from trainlib import causal_flops_per_token

    from seqmix.model import build_model
    from seqmix.train.dist import init_distributed, shutdown

    flops_cache = {}

    def flops_of(arch: str, seq: int) -> float:
        if (arch, seq) not in flops_cache:
            from seqmix.tokenizer import tokenizer_vocab_size
            from seqmix.train.loop import model_config
            from seqmix.train.schema import find_recipe, load_recipe

            recipe = load_recipe(find_recipe(arch, [ROOT / "recipes"]), [f"data.seq_len={seq}"])
            lm = build_model(model_config(recipe, tokenizer_vocab_size(recipe.data.tokenizer)), device="meta")
            flops_cache[arch, seq] = causal_flops_per_token(lm, seq)
        return flops_cache[arch, seq]

    row_tokens = {k: int(v) for k, _, v in (item.partition("=") for item in args.row_tokens)}

    def micro_for(key: str, T: int) -> int:
        return max(1, row_tokens.get(key, args.tokens_per_step) // T)

    plan = []
    for T in args.seq_lens:
        for v in (args.llama if T <= 2048 else [v for v in args.llama if v in args.llama_at_long]):
            plan.append({"kind": "llama", "variant": v, "seq_len": T, "micro_batch": micro_for(f"llama-{v}", T)})
        for i, name in enumerate(args.recipes):
            for eng in args.engines:
                if eng != args.engines[0] and args.engines_at is not None and (T != args.engines_at or i):
                    continue
                for c in args.compile:
                    plan.append({"kind": "seqmix", "recipe": name, "engine": eng, "compile": c == "on",
                                 "seq_len": T, "micro_batch": micro_for(name, T)})
    # the first engine's rows and the peer first (the table the targets read), then the extra engines
    plan.sort(key=lambda r: r["kind"] == "seqmix" and r["engine"] != args.engines[0])
    device_name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "CPU"
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    init_distributed()
    rows = []
    try:
        for row in plan:
            rows.append(run_row(row, args, flops_of))
            sys.stderr.write(json.dumps(rows[-1]) + "\n")
            if out:
                (out / "train.json").write_text(json.dumps({"device": device_name, "rows": rows}, indent=1) + "\n")
                (out / "train.md").write_text(markdown(rows, device_name) + "\n")
    finally:
        shutdown()
    sys.stdout.write(markdown(rows, device_name) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
