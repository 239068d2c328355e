"""Training throughput side by side: tokens/s and MFU of full training steps (forward, backward, AdamW through the
DeepSpeed engine of `recipes/pretrain.py`) on synthetic tokens, one device, printed as a markdown table.

    python kernels/bench/bench_train.py                                   # H200: 360m models at 2048 and 8192
    python kernels/bench/bench_train.py --recipes based-360m --seq-lens 2048 --steps 50
    python kernels/bench/bench_train.py --recipes tiny --seq-lens 64 --tokens-per-step 512 --steps 3 --warmup 1

Each row: the recipe's model, dtype and ZeRO stage (bf16 for the reference recipes), a micro batch of
tokens_per_step / seq_len sequences and no accumulation; the mean over `--steps` timed steps after `--warmup`.
MFU = tokens/s x 3 x forward FLOPs/token (`HybridLM.flops_per_token`, which counts each mixer's own FLOPs at that
length) / the device's dense bf16 peak. A configuration that runs out of memory is reported as OOM.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RECIPES = ("based-360m", "attn-360m", "mamba-360m")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(name: str, seq_len: int, tokens_per_step: int, steps: int, warmup: int, overrides: list[str],
              max_seconds: float = float("inf")) -> dict:
    """Time `steps` training steps of recipe `name` at `seq_len` on synthetic tokens after `warmup` untimed ones
    (fewer of both when a configuration is slow: about `max_seconds` each, at least one timed); one table row."""
    import numpy as np
    from deepspeed.accelerator import get_accelerator

    from seqmix.tokenizer import tokenizer_vocab_size
    from seqmix.train.data import SyntheticTokens, get_batch
    from seqmix.train.loop import build_engine, peak_flops
    from seqmix.train.schema import find_recipe, load_recipe

    micro = max(1, tokens_per_step // seq_len)
    recipe = load_recipe(find_recipe(name, [ROOT / "recipes"]), [
        f"data.seq_len={seq_len}", "data.source=synthetic", f"train.micro_batch={micro}",
        f"train.global_batch={micro}", f"train.steps={steps + warmup}", "optim.warmup_steps=0", *overrides])
    device = torch.device(get_accelerator().device_name(0))
    row = {"recipe": name, "seq_len": seq_len, "micro_batch": micro, "dtype": recipe.train.dtype,
           "zero": recipe.zero.stage}
    engine = None
    try:
        vocab = tokenizer_vocab_size(recipe.data.tokenizer)  # synthetic tokens: no tokenizer files needed
        built = build_engine(recipe, vocab, 1, device.type)
        engine, row["params"], fwd_flops = built.engine, built.num_params, built.flops_per_token
        data = SyntheticTokens(seq_len, built.lm.config.vocab_size, seed=0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, loss, warm, step, t_begin = [], float("nan"), 0, 0, time.perf_counter()
        while len(times) < steps:
            x, y = get_batch(data, np.arange(step * micro, (step + 1) * micro), device)
            step += 1
            _sync(device)
            t0 = time.perf_counter()
            out = engine(x, y)
            engine.backward(out)
            engine.step()
            _sync(device)
            loss = out.item()
            if warm < warmup and time.perf_counter() - t_begin < max_seconds / 2:  # slow configs warm up less
                warm += 1
                continue
            times.append(time.perf_counter() - t0)
            if sum(times) > max_seconds:
                break
        step_s = sum(times) / len(times)
        tok_s = micro * seq_len / step_s
        peak = peak_flops(device, recipe.train.dtype, recipe.log.peak_tflops)
        row.update(step_ms=1e3 * step_s, tokens_per_s=tok_s, loss=loss, timed_steps=len(times),
                   mfu=tok_s * 3 * fwd_flops / peak if peak else None,
                   peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    finally:
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict], device_name: str) -> str:
    head = "| recipe | seq | micro batch | dtype | params | steps | step (ms) | tokens/s | MFU | peak mem (GiB) |"
    lines = [f"Training throughput on {device_name} (synthetic tokens, one device, ZeRO from the recipe)", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | {r['seq_len']} | {r['micro_batch']} | {r['dtype']} | "
                         f"{r.get('params', 0):,} | - | {r['error']} | - | - | - |")
            continue
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        lines.append(f"| {r['recipe']} | {r['seq_len']} | {r['micro_batch']} | {r['dtype']} | {r['params']:,} | "
                     f"{r['timed_steps']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | {mem} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), help="recipe names or YAML paths")
    ap.add_argument("--seq-lens", nargs="+", type=int, default=[2048, 8192])
    ap.add_argument("--tokens-per-step", type=int, default=16384, help="micro batch = this / seq_len sequences")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="stop timing a configuration after this long")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                    help="recipe overrides for every row, e.g. train.dtype=bf16 zero.stage=0")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)

    from seqmix.train.dist import init_distributed, shutdown

    init_distributed()
    try:
        rows = [bench_one(name, T, args.tokens_per_step, args.steps, args.warmup, args.overrides, args.max_seconds)
                for T in args.seq_lens for name in args.recipes]
    finally:
        shutdown()
    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    sys.stdout.write(markdown(rows, device_name) + "\n")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"device": device_name, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
