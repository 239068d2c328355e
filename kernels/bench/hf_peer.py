"""The peer a user would pick instead of a seqmix attention model: transformers' LlamaForCausalLM of the same shape,
decoded by transformers' own generate (static cache; compiled by transformers itself, or eager). Used by
bench_generate.py."""
from __future__ import annotations

import time
import warnings

import torch


def llama_shape_of(model) -> dict:
    """Width, depth, heads, kv heads, head dim, SwiGLU width and head tying of a seqmix `(attn, mlp) * N` model."""
    blocks = list(model.blocks)
    attn, mlp = blocks[0::2], blocks[1::2]
    if not attn or len(attn) != len(mlp) or not all(hasattr(b.mixer, "n_kv_heads") for b in attn) \
            or not all(hasattr(b.mixer, "fc2") for b in mlp):
        raise ValueError("the Llama peer is built from an (attn, mlp) * N model, e.g. attn-1b")
    a = attn[0].mixer
    return dict(hidden_size=model.config.d_model, num_hidden_layers=len(attn), num_attention_heads=a.n_heads,
                num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim,
                intermediate_size=mlp[0].mixer.fc2.weight.shape[1], vocab_size=model.embed.weight.shape[0],
                tie_word_embeddings=model.config.tie_embeddings)


def build_llama(shape: dict, device, dtype):
    """A random-weight LlamaForCausalLM (SDPA attention, RoPE on the whole head) of `shape`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, max_position_embeddings=16384, rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False, attn_implementation="sdpa", bos_token_id=None,
                      eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def kv_bytes(shape: dict, seqlen: int, dtype) -> int:
    """Bytes of its KV cache per sequence at `seqlen` tokens."""
    per_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * shape["head_dim"]
    return per_token * seqlen * dtype.itemsize


def _generate(llm, prompts, **kw):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        return llm.generate(prompts, **kw)


def run_llama(llm, batch: int, prompt_len: int, new_tokens: int, compiled: bool) -> dict:
    """Prefill `batch` random prompts and decode `new_tokens` greedily with transformers' generate and a StaticCache
    of exactly prompt + new tokens; a short warm-up generate on the same cache compiles the decode step first (when
    `compiled`), so compilation is outside the timing. Same keys as bench_generate.run_one."""
    from transformers import LogitsProcessor, LogitsProcessorList, StaticCache

    device = llm.device
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, llm.config.vocab_size, (batch, prompt_len), generator=g).to(device)
    cache = StaticCache(config=llm.config, max_cache_len=prompt_len + new_tokens)
    # past_key_values: the name every transformers 5.x takes (5.24 calls it `cache` and warns about the old name)
    kw = dict(do_sample=False, past_key_values=cache, disable_compile=not compiled, attention_mask=torch.ones_like(prompts))
    _generate(llm, prompts, max_new_tokens=4, **kw)
    cache.reset()
    marks: list[float] = []

    class FirstToken(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if not marks:  # called once per new token; the first call comes right after the prefill
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                marks.append(time.perf_counter())
            return scores

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = _generate(llm, prompts, max_new_tokens=new_tokens, logits_processor=LogitsProcessorList([FirstToken()]), **kw)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    assert out.shape == (batch, prompt_len + new_tokens), out.shape
    steps = max(new_tokens - 1, 1)
    decode_s = t1 - marks[0]
    return dict(batch=batch, prefill_s=marks[0] - t0, decode_s=decode_s, tokens_per_s=batch * steps / decode_s,
                step_ms=1e3 * decode_s / steps,
                peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
