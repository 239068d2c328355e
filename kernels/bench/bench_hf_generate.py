"""Decode speed of one seqmix model through transformers' generate (seqmix.hf) vs seqmix's own generate: a table.

    python kernels/bench/bench_hf_generate.py --out kernels/bench/results/hf_generate_h200.md     # the GPU run
    python kernels/bench/bench_hf_generate.py --model "based,swa:8,mlp" --d-model 64 --heads 4 \
        --batch 1 --new-tokens 8 --out /tmp/hf.md                                                # logic check on CPU

Random weights (bf16 on CUDA), greedy, random prompts of --prompt-len tokens. Both paths run the same HybridLM;
transformers' loop calls `SeqmixForCausalLM.forward` once per token (the SeqmixCache replays a CUDA graph of
`HybridLM.step`, captured anew for every generate call and counted in its time, plus transformers' own logits
processing and stopping checks); seqmix's decode graph is captured once per shape, before the timing. The table also says whether the
two produced the same tokens (bf16 ties can differ between a graph and eager kernels; fp32 tests check equality).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch

import seqmix.hf  # noqa: F401  (registers the Auto classes)
from seqmix.config import resolve_model
from seqmix.generate import decode_step, generate
from seqmix.hf import SeqmixForCausalLM
from seqmix.model import build_model


def timed(fn, device) -> tuple[float, torch.Tensor]:
    fn()  # warm-up (CUDA graph capture, autotuning)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="named architecture or spec (repeatable; default based-360m)")
    p.add_argument("--d-model", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--batch", type=int, action="append")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for spec in args.model or ["based-360m"]:
        config = resolve_model(spec, d_model=args.d_model, n_heads=args.heads)
        model = build_model(config, device=device, dtype=dtype).eval()
        hf = SeqmixForCausalLM.from_hybrid(model).eval()
        for batch in args.batch or [1, 16]:
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, config.vocab_size, (batch, args.prompt_len), generator=g).to(device)
            graph = device.type == "cuda"
            if graph:
                decode_step(model, batch, args.prompt_len + args.new_tokens, cuda_graph=True)
            with torch.inference_mode():
                t_sm, ours = timed(lambda: generate(model, ids, max_new_tokens=args.new_tokens, temperature=0,
                                                    cuda_graph=graph), device)
            with torch.no_grad():  # transformers' generate: its cache captures its own graph on each call
                t_hf, theirs = timed(lambda: hf.generate(ids, max_new_tokens=args.new_tokens,
                                                         min_new_tokens=args.new_tokens, do_sample=False,
                                                         pad_token_id=0), device)
            n = batch * args.new_tokens
            rows.append(f"| {spec} | {model.num_params() / 1e6:,.0f}M | {batch} | {n / t_sm:,.0f} | {n / t_hf:,.0f} | "
                        f"{t_hf / t_sm:.2f}x | {'yes' if torch.equal(theirs[:, args.prompt_len:], ours) else 'no'} |")
        del model, hf
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    lines = [
        f"# transformers generate (seqmix.hf) vs seqmix generate, {dtype}",
        "",
        f"{datetime.date.today()} · {name} · torch {torch.__version__} · python {platform.python_version()} · "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, random weights; tokens/s count "
        "prefill + decode (new tokens / wall time)",
        "",
        "| model | params | batch | seqmix tok/s | transformers tok/s | slowdown | same tokens |",
        "|:---|---:|---:|---:|---:|---:|:---|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
