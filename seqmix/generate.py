"""Generation: one prefill per distinct prompt length, then fixed-shape decode steps (CUDA-graphed on GPU)."""
from __future__ import annotations

import weakref
from typing import Callable, Optional, Sequence, Union

import torch

from seqmix.sampling import SamplingParams, make_generator, sample_next

Prompts = Union[torch.Tensor, Sequence[Sequence[int]], Sequence[int]]
StepCallback = Callable[[int, torch.Tensor], None]  # (index of the new token, tokens [B]) after every step


class NonFiniteLogitsError(RuntimeError):
    """The model produced NaN or infinite logits: generation stops instead of emitting a meaningless token."""


def _nonfinite_B(logits_BV: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(logits_BV).all(-1)


def _raise_nonfinite(first_bad_B: torch.Tensor) -> None:
    """Raise if any sequence has a first non-finite step recorded (>= 0) in first_bad_B [B] (one host sync)."""
    bad = [(b, i) for b, i in enumerate(first_bad_B.tolist()) if i >= 0]
    if bad:
        b, i = min(bad, key=lambda x: x[1])
        raise NonFiniteLogitsError(
            f"the model's logits are NaN or infinite for new token {i} of sequence {b} "
            f"({len(bad)} of {first_bad_B.numel()} sequences affected); generation stopped instead of emitting "
            "a meaningless token. The weights or activations hold NaN/inf: check the checkpoint (a forward "
            "pass of seqmix build --forward, or float32 instead of float16)")


# -- prompts ----------------------------------------------------------------------------------------
def prompt_list(
    input_ids: Prompts, attention_mask: Optional[torch.Tensor], vocab_size: int, device
) -> list[torch.Tensor]:
    """The prompts as unpadded int64 rows on `device`, checked (non-empty, ids in [0, vocab_size)).

    input_ids: int tensor [B, T] (left-padded when attention_mask [B, T] marks the real tokens with 1),
    a 1-D tensor or list of ints (one prompt), or a list of token-id lists of any lengths.
    """
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.dim() not in (1, 2):
            raise ValueError(f"input_ids must be an integer tensor [B, T] or [T], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        ids_BT = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
        lengths = [ids_BT.shape[1]] * ids_BT.shape[0]
        if attention_mask is not None:
            mask_BT = attention_mask.reshape(1, -1) if attention_mask.dim() == 1 else attention_mask
            if mask_BT.shape != ids_BT.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have the shape of "
                                 f"input_ids {tuple(input_ids.shape)}")
            lengths = left_pad_lengths(mask_BT)
        rows = [ids_BT[b, ids_BT.shape[1] - n:] for b, n in enumerate(lengths)]
    else:
        seqs = list(input_ids)
        if seqs and not isinstance(seqs[0], (list, tuple, torch.Tensor)):
            seqs = [seqs]  # one prompt given as a flat list of ids
        if attention_mask is not None:
            raise ValueError("attention_mask is only for a padded input_ids tensor; lists carry their lengths")
        rows = [torch.as_tensor(s, dtype=torch.int64) for s in seqs]
    if not rows:
        raise ValueError("no prompts given: input_ids is empty")
    empty = [b for b, r in enumerate(rows) if r.numel() == 0]
    if empty:
        raise ValueError(f"prompt {empty[0]} is empty: every sequence needs at least one token to condition on "
                         f"(e.g. the tokenizer's end-of-text id)")
    rows = [r.to(device=device, dtype=torch.int64) for r in rows]
    flat = torch.cat(rows)
    if int(flat.min()) < 0 or int(flat.max()) >= vocab_size:  # two host syncs for the whole batch
        b, bad = next((b, int(t)) for b, r in enumerate(rows) for t in r.tolist() if not 0 <= t < vocab_size)
        raise ValueError(f"prompt {b} has token id {bad} outside the vocabulary [0, {vocab_size}); "
                         f"was it encoded with this model's tokenizer?")
    return rows


def left_pad_lengths(mask_BT: torch.Tensor) -> list[int]:
    """Real tokens per row of a left-padding attention mask [B, T]: 0 for the padding, then 1 for the tokens."""
    m = mask_BT.to(torch.int64).cpu()
    if ((m != 0) & (m != 1)).any() or (m[:, 1:] < m[:, :-1]).any():
        raise ValueError("attention_mask must be 0 for left padding and 1 for the prompt tokens after it (a 0 "
                         "after a 1 means right padding: put the padding on the left, tokenizer.padding_side = "
                         "'left')")
    return m.sum(1).tolist()


def check_length(model, prompt_len: int, max_new_tokens: int) -> None:
    """Models with a KV cache (state kind "cache") support at most config.max_seqlen tokens in all."""
    cache_blocks = [i for i, b in enumerate(model.blocks) if b.mixer.state_kind == "cache"]
    limit = model.config.max_seqlen
    if cache_blocks and prompt_len + max_new_tokens > limit:
        fixes = ([f"max_new_tokens <= {limit - prompt_len}"] if prompt_len < limit else []) + (
            [f"a prompt of at most {limit - max_new_tokens} tokens (keep its last ones)"]
            if max_new_tokens < limit else [])
        raise ValueError(
            f"a prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} = {prompt_len + max_new_tokens} "
            f"tokens exceeds the {limit} this model supports (config.max_seqlen; blocks {cache_blocks} keep a "
            f"KV cache that long); use {' or '.join(fixes)}"
        )


# -- prefill ----------------------------------------------------------------------------------------
def prefill_chunks(model, prompts: list[torch.Tensor], states: Optional[list], *, max_tokens: int = 16384):
    """Run every non-empty prompt through the parallel forward and leave its final state in its row of `states`.

    Prompts of equal length L form one unpadded batch (so no padding ever enters a state); each forward sees
    at most `max_tokens` tokens (rows, then time chunks with the state carried, bound the memory). `states`
    (one entry per block, batch = len(prompts), fresh) may be None when no state is wanted. A group's first
    chunk goes through `model.prefill` (each mixer's fresh fast path), later chunks continue the state. Yields,
    per forward, (row indices idx_G, the chunk's first position t0 in the prompt, L, hidden states h_GtD).
    """
    lengths = [int(p.numel()) for p in prompts]
    for L in sorted(set(lengths) - {0}):
        rows = [b for b, n in enumerate(lengths) if n == L]
        per = max(1, max_tokens // L)
        for i in range(0, len(rows), per):
            idx_G = torch.tensor(rows[i:i + per], device=prompts[0].device)
            tokens_GL = torch.stack([prompts[b] for b in rows[i:i + per]])
            group = None if states is None else [None if s is None else {k: v[idx_G] for k, v in s.items()}
                                                 for s in states]
            for t0 in range(0, L, max_tokens):
                chunk_Gt = tokens_GL[:, t0:t0 + max_tokens]
                if t0 == 0 and group is not None:
                    h_GtD = model.prefill(chunk_Gt, group)
                else:
                    h_GtD, group = model.hidden(chunk_Gt, group, return_states=True)
                yield idx_G, t0, L, h_GtD
            for s, g in zip(states or (), group):
                for k, v in (s or {}).items():
                    v[idx_G] = g[k]


def prefill(model, prompts: list[torch.Tensor], states: list, *, max_tokens: int = 16384) -> torch.Tensor:
    """`prefill_chunks` over non-empty prompts into fresh `states` (model.init_states(len(prompts), ...)).
    Returns the logits after each prompt's last token [B, vocab_size]."""
    out_BV: Optional[torch.Tensor] = None
    for idx_G, t0, L, h_GtD in prefill_chunks(model, prompts, states, max_tokens=max_tokens):
        if t0 + h_GtD.shape[1] < L:
            continue
        logits_GV = model.logits(h_GtD[:, -1])
        if out_BV is None:
            out_BV = logits_GV.new_empty(len(prompts), logits_GV.shape[-1])
        out_BV[idx_G] = logits_GV
    return out_BV


# -- decode -----------------------------------------------------------------------------------------
class DecodeStep:
    """model.step at a fixed batch size over states it preallocates for `max_seqlen` tokens.

    With cuda_graph=True (CUDA only) the step is captured once in a CUDA graph and replayed: the token goes
    into a static input buffer, the states are updated in place, the logits land in a static output buffer
    (valid until the next call). With compile=True the step is `torch.compile`d first (the mixers' Triton kernels
    are custom ops, so inductor fuses the PyTorch glue between them: norms, residual adds, gates, state updates);
    compilation happens on the first call (or before the capture). The states must be filled (by `prefill`)
    after construction.
    """

    def __init__(self, model, batch_size: int, max_seqlen: int, *, cuda_graph: bool = False, compile: bool = False):
        device = model.embed.weight.device
        self.batch_size = batch_size
        self.states = model.init_states(batch_size, max_seqlen)
        self.token_B = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._model = model
        self._step = torch.compile(model.step, dynamic=False) if compile else model.step
        if cuda_graph:
            if device.type != "cuda":
                raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
            self._capture()
            self._model = None  # the graph holds what it needs; a cached decoder must not keep the model alive

    def reset(self) -> None:
        """Zero every state tensor (positions included), ready for a new prefill."""
        for s in self.states:
            for v in (s or {}).values():
                v.zero_()

    def _capture(self) -> None:
        model = self._model
        with torch.cuda.device(model.embed.weight.device):
            self._capture_on_device(model)

    def _capture_on_device(self, model) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (allocator, lazy init) off the capturing stream
            for _ in range(2):
                self.reset()
                _, new_states = self._step(self.token_B, self.states)
                self._check_in_place(model, new_states)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits_BV, _ = self._step(self.token_B, self.states)
        self.reset()
        self._step = None  # the graph holds what it needs

    def _check_in_place(self, model, new_states: list) -> None:
        for i, (old, new) in enumerate(zip(self.states, new_states)):
            if (old is None) != (new is None) or (old is not None and any(
                    new.get(k) is not v for k, v in old.items())):
                raise RuntimeError(
                    f"block {i} ({model.blocks[i].mixer.name}) returns new state tensors from step(); a CUDA graph "
                    f"needs them updated in place. Fix the mixer's step, or pass cuda_graph=False."
                )

    def __call__(self, token_B: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence; returns the next logits [B, vocab_size]."""
        if self.graph is None:
            logits_BV, self.states = self._step(token_B, self.states)
            return logits_BV
        self.token_B.copy_(token_B)
        self.graph.replay()
        return self.logits_BV


# One captured decoder per model (the latest batch size / cache length), reused by later calls with the same
# shapes and the same weight buffers; a new shape replaces it, so large KV caches are not kept twice.
_GRAPHED: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, DecodeStep]]" = weakref.WeakKeyDictionary()


@torch.inference_mode()
def decode_step(model, batch_size: int, max_seqlen: int, *, cuda_graph: bool, compile: bool = False) -> DecodeStep:
    """A DecodeStep for these shapes: eager (compiled if asked), or a cached CUDA-graph one (captured once per
    batch size, and per cache length for models with a KV cache). Its states are reset."""
    if not cuda_graph:
        return DecodeStep(model, batch_size, max_seqlen, compile=compile)
    has_cache = any(b.mixer.state_kind == "cache" for b in model.blocks)
    key = (batch_size, max_seqlen if has_cache else None, compile,
           tuple((p.data_ptr(), p.dtype) for p in model.parameters()))
    hit = _GRAPHED.get(model)
    if hit is not None and hit[0] == key:
        hit[1].reset()
        return hit[1]
    _GRAPHED.pop(model, None)  # free the old graph and its buffers before allocating new ones
    dec = DecodeStep(model, batch_size, max_seqlen, cuda_graph=True, compile=compile)
    _GRAPHED[model] = (key, dec)
    return dec


def clear_decode_cache() -> None:
    """Drop every cached CUDA-graph decoder (and the state buffers it holds)."""
    _GRAPHED.clear()


# -- the loop ---------------------------------------------------------------------------------------
@torch.inference_mode()
def generate(
    model,
    input_ids: Prompts,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: Union[int, Sequence[int], None] = None,
    pad_token_id: Optional[int] = None,
    seed: Optional[int] = None,
    callback: Optional[StepCallback] = None,
    cuda_graph: Optional[bool] = None,
    compile: bool = False,
    prefill_tokens: int = 16384,
) -> torch.Tensor:
    """Continue each prompt by up to `max_new_tokens` tokens; returns the new tokens only, int64 [B, N].

    input_ids: [B, T] tensor (left-padded, with attention_mask [B, T] = 1 on the real tokens), or a list of
        token-id lists of any lengths, or one prompt as a 1-D tensor / list of ints. Per-sequence lengths are
        honoured exactly: the output for a prompt does not depend on the others in the batch.
    temperature: 0 = greedy; top_k: 0 = off; top_p in (0, 1], 1 = off (see SamplingParams).
    eos_token_id: one id or several; a sequence that emits one is finished: its later positions hold
        `pad_token_id` (default: the first eos id), and generation stops early once every sequence is
        finished, so N <= max_new_tokens.
    seed: seeds a generator on the model's device; the same seed gives the same tokens (with or without
        CUDA graphs). None draws from torch's global generator.
    callback(i, tokens_B): called after each new token (i counts from 0), e.g. to stream text.
    cuda_graph: capture the decode step in a CUDA graph; default True on CUDA.
    compile: torch.compile the decode step (before the capture); the tokens are the eager step's. Each batch
        size (and KV-cache length) compiles once; past torch._dynamo.config.cache_size_limit shapes (default 8)
        dynamo falls back to the eager step.
    prefill_tokens: at most this many prompt tokens per prefill forward (bounds prefill memory).
    """
    params = SamplingParams(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    device = model.embed.weight.device
    prompts = prompt_list(input_ids, attention_mask, model.config.vocab_size, device)
    B, L = len(prompts), max(int(p.numel()) for p in prompts)
    check_length(model, L, max_new_tokens)
    if prefill_tokens < 1:
        raise ValueError(f"prefill_tokens must be >= 1, got {prefill_tokens}")
    stop_ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    stop = torch.tensor(stop_ids, dtype=torch.int64, device=device) if stop_ids else None
    pad = pad_token_id if pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
    out_BN = torch.full((B, max_new_tokens), pad, dtype=torch.int64, device=device)
    if max_new_tokens == 0:
        return out_BN
    graphed = device.type == "cuda" if cuda_graph is None else cuda_graph
    decoder = decode_step(model, B, L + max_new_tokens, cuda_graph=graphed, compile=compile)
    logits_BV = prefill(model, prompts, decoder.states, max_tokens=prefill_tokens)
    generator = make_generator(seed, device)
    finished_B = torch.zeros(B, dtype=torch.bool, device=device)
    # Non-finite logits are recorded per sequence on the device; a loop that syncs every step anyway (eos or a
    # callback) checks before emitting the token, the others once at the end, so decoding gains no host sync.
    first_bad_B = torch.where(_nonfinite_B(logits_BV), 0, -1)
    _raise_nonfinite(first_bad_B)  # after prefill: one sync per call
    per_step = stop is not None or callback is not None
    next_B = sample_next(logits_BV, params, generator)
    for i in range(max_new_tokens):
        if per_step and i > 0:
            _raise_nonfinite(first_bad_B)
        token_B = next_B if stop is None else next_B.masked_fill(finished_B, pad)
        out_BN[:, i] = token_B
        if callback is not None:
            callback(i, token_B)
        if stop is not None:
            finished_B |= torch.isin(token_B, stop)
            if bool(finished_B.all()):
                return out_BN[:, : i + 1]
        if i + 1 < max_new_tokens:  # finished rows keep decoding what they sampled; only `pad` is recorded
            logits_BV = decoder(next_B)
            first_bad_B = torch.where((first_bad_B < 0) & _nonfinite_B(logits_BV) & ~finished_B, i + 1,
                                      first_bad_B)
            next_B = sample_next(logits_BV, params, generator)
    _raise_nonfinite(first_bad_B)
    return out_BN
