"""Decode throughput and per-step latency of seqmix `generate` (based-1b vs attn-1b, random weights): a markdown table.

    python kernels/bench/bench_generate.py --out kernels/bench/results/generate_h200.md        # the GPU run
    python kernels/bench/bench_generate.py --quick --model "based,swa:8,mlp" --model "attn,mlp" \
        --d-model 64 --heads 4 --out /tmp/generate.md                                         # logic check on CPU

Each model is built with random weights (bf16 on CUDA), prompts of --prompt-len random tokens are prefilled,
and --new-tokens tokens are decoded greedily with the CUDA-graph decode step, at batch sizes 1, 2, 4, ... until
one does not fit (or --max-batch). `--llama compiled,eager` adds the peer a user would otherwise pick:
transformers' LlamaForCausalLM of the shape of the (attn, mlp) * N model `--peer-of` (default attn-1b), random
weights, decoded by transformers' generate with a static cache, compiled by transformers itself or eager
(kernels/bench/hf_peer.py). Decode time runs from the first new token (after prefill) to the last one:
tokens/s = batch * (new_tokens - 1) / time, step = time / (new_tokens - 1). The batch-1 step is compared with
the time to read every parameter once (parameter bytes / measured device copy bandwidth, read + write counted).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import platform
import time
from pathlib import Path

import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_peer  # noqa: E402

from seqmix.config import resolve_model  # noqa: E402
from seqmix.generate import clear_decode_cache, decode_step, generate
from seqmix.model import build_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int, iters: int = 20) -> float:
    """Bytes/s moved by dst.copy_(src) on `device`, counting the read and the write."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * src.element_size() * iters / (time.perf_counter() - t0)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_one(model, batch: int, prompt_len: int, new_tokens: int, cuda_graph: bool, compile: bool = False) -> dict:
    """Prefill `batch` random prompts and decode `new_tokens` greedily; times prefill and decode separately."""
    device = model.embed.weight.device
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).to(device)
    if cuda_graph:  # capture (cached by generate for these shapes) outside the timed region
        decode_step(model, batch, prompt_len + new_tokens, cuda_graph=True, compile=compile)
    elif compile:  # compile for these state shapes outside the timed region (dynamo caches it per shape)
        with torch.inference_mode():  # as generate runs it (a tensor made outside would not match its guards)
            decode_step(model, batch, prompt_len + new_tokens, cuda_graph=False, compile=True)(torch.zeros(batch, dtype=torch.int64, device=device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    marks: list[float] = []

    def first_token(i: int, tokens_B: torch.Tensor) -> None:
        if i == 0:
            sync(device)
            marks.append(time.perf_counter())

    sync(device)
    t0 = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=new_tokens, temperature=0, cuda_graph=cuda_graph,
                   compile=compile, callback=first_token)
    sync(device)
    t1 = time.perf_counter()
    assert out.shape == (batch, new_tokens)
    steps = max(new_tokens - 1, 1)
    decode_s = t1 - marks[0]
    return dict(batch=batch, prefill_s=marks[0] - t0, decode_s=decode_s, tokens_per_s=batch * steps / decode_s,
                step_ms=1e3 * decode_s / steps,
                peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)


def sweep(model, args, device, rows: list[dict], on_row, runner=None) -> None:
    """Batch sizes 1, 2, 4, ... (or --batches) until one does not fit, --max-batch, or the time budget;
    appends a row per batch size to `rows` and calls on_row(row) after each. runner(batch) times one batch size
    (default: seqmix's generate on `model`)."""
    runner = runner or (lambda b: run_one(model, b, args.prompt_len, args.new_tokens, args.cuda_graph, args.compile))
    batches = args.batches or [2**i for i in range(32) if 2**i <= args.max_batch]
    started = time.perf_counter()
    for b in batches:
        if rows and args.budget_s and (time.perf_counter() - started) + 2.5 * rows[-1]["wall_s"] > args.budget_s:
            rows.append(dict(batch=b, note="skipped (time budget)"))
            on_row(rows[-1])
            break
        t = time.perf_counter()
        try:
            row = runner(b)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not is_oom(e):
                raise
            row = dict(batch=b, note="does not fit (out of memory)")
        row["wall_s"] = time.perf_counter() - t
        clear_decode_cache()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        on_row(row)
        if "note" in row:
            break


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(meta: dict, results: list[dict]) -> str:
    lines = [
        "# seqmix generate: decode throughput",
        "",
        f"{meta['date']} · {meta['device']} · torch {meta['torch']} · {meta['dtype']} · prompt {meta['prompt_len']} "
        f"tokens · {meta['new_tokens']} new tokens · greedy · random weights · CUDA graphs "
        f"{'on' if meta['cuda_graph'] else 'off'} · seqmix step {'compiled' if meta['compile'] else 'eager'} · copy bandwidth {meta['copy_bw'] / 1e9:,.0f} GB/s "
        "(device copy, read + write counted)",
        "",
        "| model | batch | prefill (s) | decode tokens/s | step (ms) | state / seq | peak mem (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for row in r["rows"]:
            if "note" in row:
                lines.append(f"| {r['name']} | {row['batch']} | {row['note']} | | | | |")
                continue
            peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
            lines.append(f"| {r['name']} | {row['batch']} | {row['prefill_s']:.2f} | {row['tokens_per_s']:,.0f} | "
                         f"{row['step_ms']:.3f} | {fmt_bytes(r['state_bytes'])} | {peak} |")
    lines += ["", "| model | params | weight bytes | weight-read floor (ms) | batch-1 step (ms) | step / floor | "
              "peak tokens/s (batch) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ok = [row for row in r["rows"] if "note" not in row]
        floor_ms = 1e3 * r["weight_bytes"] / meta["copy_bw"]
        b1 = next((row for row in ok if row["batch"] == 1), None)
        best = max(ok, key=lambda row: row["tokens_per_s"], default=None)
        lines.append(
            f"| {r['name']} | {r['params']:,} | {fmt_bytes(r['weight_bytes'])} | {floor_ms:.3f} | "
            + (f"{b1['step_ms']:.3f} | {b1['step_ms'] / floor_ms:.2f}x" if b1 else "- | -")
            + (f" | {best['tokens_per_s']:,.0f} ({best['batch']}) |" if best else " | - |"))
    peaks = [max((row["tokens_per_s"] for row in r["rows"] if "note" not in row), default=0.0) for r in results]
    if len(results) >= 2:
        lines.append("")
        for r, peak in zip(results[1:], peaks[1:]):
            if peak > 0:
                lines.append(f"Peak decode throughput {results[0]['name']} / {r['name']}: "
                             f"{peaks[0] / peak:.1f}x (each at its own best batch).")
    return "\n".join(lines) + "\n"


def model_config(spec: str, args):
    """The ModelConfig of a named architecture or spec with the command line's size overrides, its KV cache long
    enough for prompt + new tokens."""
    return resolve_model(spec, d_model=args.d_model, n_heads=args.heads, layers=args.layers,
                         max_seqlen=max(2048, args.prompt_len + args.new_tokens))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", "--spec", dest="models", action="append",
                   help="named architecture or spec string; repeat for several (default: based-1b and attn-1b)")
    p.add_argument("--d-model", type=int, default=None, help="override the width of every model")
    p.add_argument("--heads", type=int, default=None, help="override the default head count")
    p.add_argument("--layers", type=int, default=None, help="tile each spec to this many blocks")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated batch sizes (default 1, 2, 4, ... until out of memory)")
    p.add_argument("--max-batch", type=int, default=8192)
    p.add_argument("--budget-s", type=float, default=None,
                   help="per model: start no batch size that would likely end after this many seconds")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="default cuda when available")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false")
    p.add_argument("--compile", action="store_true", help="torch.compile seqmix's decode step (before the capture)")
    p.add_argument("--llama", default="", help="comma-separated transformers Llama peer variants to add: "
                   "compiled (transformers' own torch.compile of the decode step), eager")
    p.add_argument("--peer-of", default="attn-1b", help="the (attn, mlp) * N model whose shape the Llama peer takes")
    p.add_argument("--quick", action="store_true", help="prompt 16, 8 new tokens, batches 1 and 2 (a logic check)")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    args.models = args.models or ["based-1b", "attn-1b"]
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.cuda_graph = args.cuda_graph and args.device.type == "cuda"
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32"))
    if args.quick:
        args.prompt_len, args.new_tokens, args.batches = 16, 8, args.batches or [1, 2]
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    device = args.device
    if args.compile:  # one compiled step per batch size (and cache length): more than dynamo's default 8
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU {platform.machine()} ({torch.get_num_threads()} threads)")
    meta = dict(date=datetime.date.today().isoformat(), device=name, torch=torch.__version__,
                dtype=str(args.dtype).replace("torch.", ""), prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                cuda_graph=args.cuda_graph, compile=args.compile,
                copy_bw=copy_bandwidth(device, 2**31 if device.type == "cuda" and not args.quick else 2**25))
    results: list[dict] = []

    def emit(row=None) -> None:
        table = render(meta, results)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(table)  # rewritten after every row: a run cut short keeps what it measured
        if row is not None:
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)

    for spec in args.models:
        config = model_config(spec, args)
        torch.manual_seed(0)
        model = build_model(config, device=device, dtype=args.dtype).eval()
        entry = dict(name=spec if len(spec) <= 24 else spec[:21] + "...", params=model.num_params(),
                     weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
                     state_bytes=model.state_bytes(1, args.prompt_len + args.new_tokens, args.dtype), rows=[])
        results.append(entry)
        print(f"{entry['name']}: {entry['params']:,} parameters", flush=True)
        sweep(model, args, device, entry["rows"], emit)
        del model
        clear_decode_cache()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    variants = [v for v in args.llama.split(",") if v]
    if variants:
        config = model_config(args.peer_of, args)
        shape = hf_peer.llama_shape_of(build_model(config, device="meta"))
        llm = hf_peer.build_llama(shape, device, args.dtype)
        for v in variants:
            if v not in ("compiled", "eager"):
                raise SystemExit(f"--llama: unknown variant {v!r} (compiled, eager)")
            entry = dict(name=f"transformers Llama, {v}", params=sum(p.numel() for p in llm.parameters()),
                         weight_bytes=sum(p.numel() * p.element_size() for p in llm.parameters()),
                         state_bytes=hf_peer.kv_bytes(shape, args.prompt_len + args.new_tokens, args.dtype), rows=[])
            results.append(entry)
            print(f"{entry['name']}: {entry['params']:,} parameters, shape of {args.peer_of}", flush=True)
            sweep(llm, args, device, entry["rows"], emit,
                  runner=lambda b, v=v: hf_peer.run_llama(llm, b, args.prompt_len, args.new_tokens, v == "compiled"))
        del llm
    emit()
    table = render(meta, results)
    print(table)
    return table


if __name__ == "__main__":
    main()
