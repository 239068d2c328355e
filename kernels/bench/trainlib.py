"""Pieces of the training benchmark: the timing loop, a torch.profiler summary of a step, causal MFU, and the
transformers Llama peer at the attn-360m shape. Used by bench_train.py (the profile and the peer need CUDA)."""
from __future__ import annotations

import re
import time
from typing import Callable, Optional

import torch

# Kernel classes by name: attention and sequence-mixer kernels first (cuDNN's SDPA kernels say "wgmma" too), then
# matrix products (cuBLAS / CUTLASS), then everything else (norms, casts, optimizer, inductor fusions, copies).
MIXER = re.compile(r"flash|fmha|sdpa|attention|_swa_|_based|_parallel_|_attn_|_state_|_out_|short_conv", re.I)
GEMM = re.compile(r"gemm|cutlass|nvjet|xmma|wgmma|cublas|splitK", re.I)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(step: Callable[[], torch.Tensor], steps: int, warmup: int, max_seconds: float) -> dict:
    """Mean seconds per step over `steps` (fewer past max_seconds, at least 1) after `warmup` untimed steps
    (compilation happens there); each timed step between two device synchronisations."""
    t_begin = time.perf_counter()
    loss = None
    for i in range(warmup):
        loss = step()
        sync()
        if i and time.perf_counter() - t_begin > max_seconds:  # slow configurations warm up less
            break
    times = []
    while len(times) < steps:
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
        if sum(times) > max_seconds:
            break
    return {"step_s": sum(times) / len(times), "timed_steps": len(times), "loss": float(loss),
            "warmup_s": time.perf_counter() - t_begin - sum(times)}


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def profile_steps(step: Callable[[], torch.Tensor], n: int = 2) -> dict:
    """What the GPU does during `n` steps, from a CUDA-only torch.profiler trace (little host overhead): device
    operations (kernels, memcpy, memset) per step, and shares of the wall time that are GEMMs (cuBLAS/CUTLASS
    matrix products), attention / sequence-mixer kernels, everything else, and idle (no device work at all)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    dev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = [(e.time_range.start, e.time_range.end) for e in dev]
    by = {"mixer": 0.0, "gemm": 0.0, "other": 0.0}
    names: dict[str, list] = {}
    for e in dev:
        us = e.time_range.elapsed_us()
        by["mixer" if MIXER.search(e.name) else "gemm" if GEMM.search(e.name) else "other"] += us
        rec = names.setdefault(e.name[:90], [0, 0.0])
        rec[0] += 1
        rec[1] += us
    top = sorted(names.items(), key=lambda kv: -kv[1][1])[:12]
    busy = _union_us(spans)
    return {"launches_per_step": len(dev) / n, "gemm_share": by["gemm"] / wall_us, "mixer_share": by["mixer"] / wall_us,
            "other_share": by["other"] / wall_us, "idle_share": max(0.0, 1 - busy / wall_us),
            "top_kernels": [{"name": k, "per_step": c / n, "ms_per_step": us / n / 1e3} for k, (c, us) in top]}


def causal_flops_per_token(lm, seqlen: int) -> float:
    """Forward FLOPs per token averaged over the positions of a causal sequence of `seqlen` tokens: a token at
    position t (1-based) costs flops_per_token(t), so attention counts half the full T x T (plus the diagonal)
    and a window min(t, W); the projections, MLPs and the LM head are per token."""
    head = 2 * lm.config.d_model * lm.config.padded_vocab_size
    cache: dict[str, float] = {}
    total = float(head)
    for b in lm.blocks:
        key = f"{type(b.mixer).__name__}:{sorted(b.mixer.args.items())}"
        if key not in cache:
            cache[key] = sum(b.mixer.flops_per_token(t) for t in range(1, seqlen + 1)) / seqlen
        total += cache[key]
    return total


# -- the transformers peer --------------------------------------------------------------------------------------
def llama_like(lm_config, num_layers: int, hidden: int, device="cuda"):
    """transformers.LlamaForCausalLM of attn-360m's shape (width, depth, heads, SwiGLU width, padded vocabulary,
    tied head; RoPE on the whole head, SDPA attention), fp32 on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=lm_config.padded_vocab_size, hidden_size=lm_config.d_model, intermediate_size=hidden,
                      num_hidden_layers=num_layers, num_attention_heads=lm_config.n_heads,
                      num_key_value_heads=lm_config.n_heads, max_position_embeddings=16384, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, attention_bias=False, mlp_bias=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device)


def llama_step(model, variant: str, x, y, *, lr=8e-4, grad_clip=1.0) -> Callable[[], torch.Tensor]:
    """A training step of the Llama peer. variant: "eager" (fp32 weights, bf16 autocast), "compiled" (the same,
    each decoder layer and the head + loss torch.compile'd: PyTorch's regional compilation, one graph reused by
    the 24 layers) or "compiled-bf16" (bf16 weights, compiled the same way). Fused AdamW on the weights and
    global-norm clipping, no DeepSpeed (a plain loop, as a transformers user would write it)."""
    import torch.nn.functional as F

    if variant == "compiled-bf16":
        model.bfloat16()
    compiled = variant.startswith("compiled")
    autocast = variant != "compiled-bf16"
    inner = model.model
    if compiled:
        for layer in inner.layers:
            layer.compile(dynamic=False)

    def head_loss(h, w, targets):
        return F.cross_entropy(F.linear(h, w).float().flatten(0, 1), targets.flatten())

    head = torch.compile(head_loss, dynamic=False) if compiled else head_loss
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=True)
    params = decay + rest

    def step():
        with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
            h = inner(input_ids=x, use_cache=False).last_hidden_state  # the final norm included
            loss = head(h, model.lm_head.weight, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def peak_bf16_flops() -> Optional[float]:
    from seqmix.train.loop import PEAK_FLOPS

    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
