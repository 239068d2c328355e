"""The lm-eval model `seqmix`: an HFLM whose forward and generation are seqmix's own (HybridLM, constant-state decode).

    lm_eval --model seqmix --model_args pretrained=runs/tiny/model,dtype=float32 --tasks ...   (after importing this)
    SeqmixLM(pretrained="hazyresearch/based-360m")          # bf16, max length 2048, GPT-2 tokenizer

lm-eval's HFLM does the batching, sorting, left truncation (contexts keep their last max_length - max_gen_toks
tokens) and scoring; this class swaps in a seqmix model for `_model_call` (logits for loglikelihood and
loglikelihood_rolling) and `_model_generate` (seqmix.generate: left-padded prompts run unpadded, so padding never
enters a state; greedy unless the task samples; generation stops once every row has produced an `until` string
or EOS, and HFLM cuts the text at the first of them). Tokenisation is a transformers fast tokenizer equal to the
seqmix tokenizer the model directory records (seqmix.eval.tokenizer).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from seqmix.eval.tokenizer import fast_tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_MAX_LENGTH = 2048
Progress = Callable[[int, int], None]  # (requests done, requests in all) of the current request batch


def load_model(pretrained: str, *, device: str, dtype: torch.dtype):
    """The one place evaluation loads a checkpoint: a seqmix directory, an importable checkpoint (Based repo,
    transformers Llama / Mamba, a plugin's format) or a hub name, through seqmix.io. Returns (model, directory)."""
    from seqmix.io import load, resolve_model_dir

    directory = resolve_model_dir(pretrained)
    return load(directory, device=device, dtype=dtype), directory


def tokenizer_name_for(directory: Path) -> str:
    """The tokenizer a model directory records (seqmix's tokenizer_config.json), else GPT-2 (the Based models')."""
    from seqmix.tokenizer import recorded_tokenizer

    return recorded_tokenizer(directory) or "gpt2"


class _AllStopped(Exception):
    """Raised from the generation callback once every row has finished (a stop string or EOS)."""


@register_model("seqmix")
class SeqmixLM(HFLM):
    """lm-eval's HFLM over a seqmix HybridLM. `pretrained`: a model directory or hub name (or a HybridLM, with
    `tokenizer`). Model args: dtype (bfloat16), device (cuda when available), batch_size (an int or "auto"),
    max_batch_size, max_length (2048; at most config.max_seqlen for a model with attention blocks), tokenizer
    ("gpt2" / "bytes"; default the one the directory records), cuda_graph (default: on CUDA)."""

    def __init__(self, pretrained, *, tokenizer: Optional[str] = None, dtype: Union[str, torch.dtype] = "bfloat16",
                 device: Optional[str] = None, batch_size: Union[int, str] = 1, max_batch_size: int = 64,
                 max_length: Optional[int] = None, logits_cache: bool = True, truncation: bool = False,
                 prefix_token_id: Optional[int] = None, cuda_graph: Optional[bool] = None, **unknown) -> None:
        if unknown:
            raise ValueError(f"the seqmix model does not take model_args {sorted(unknown)}; it takes pretrained, "
                             f"dtype, device, batch_size, max_batch_size, max_length, tokenizer, cuda_graph")
        TemplateLM.__init__(self)
        dtype = _dtype(dtype)
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:  # lm-eval's command line defaults --device to cuda:0; like HFLM, fall back
                logging.getLogger(__name__).warning("device %s is not available; using the CPU", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(pretrained, torch.nn.Module):
            if tokenizer is None:
                raise ValueError("pass tokenizer='gpt2' or 'bytes' with a model object (a directory records its own)")
            model, self.pretrained = pretrained.to(device=device, dtype=dtype), type(pretrained).__name__
        else:
            model, directory = load_model(str(pretrained), device=device, dtype=dtype)
            tokenizer, self.pretrained = tokenizer or tokenizer_name_for(directory), str(pretrained)
        self.tokenizer = fast_tokenizer(tokenizer)
        if model.config.vocab_size != self.tokenizer.vocab_size:
            raise ValueError(f"{self.pretrained} has a vocabulary of {model.config.vocab_size} tokens but the "
                             f"{tokenizer!r} tokenizer has {self.tokenizer.vocab_size}; pass the model's tokenizer "
                             f"(model_args tokenizer=gpt2 or tokenizer=bytes)")
        self._model, self._config, self._device = model.eval(), model.config, torch.device(device)
        self.backend, self.AUTO_MODEL_CLASS = "causal", None
        self.tokenizer_id, self.dtype_name = tokenizer, str(dtype).removeprefix("torch.")
        self.vocab_size = self.tokenizer.vocab_size
        self.logits_cache, self.truncation = logits_cache, truncation
        self._max_length = _length_limit(model, max_length)
        self.cuda_graph = cuda_graph
        if str(batch_size).startswith("auto"):
            parts = str(batch_size).split(":")
            self.batch_size_per_gpu, self.batch_schedule = parts[0], float(parts[1]) if len(parts) > 1 else 1
        else:
            self.batch_size_per_gpu, self.batch_schedule = int(batch_size), 1
        self.batch_sizes, self.max_batch_size = {}, int(max_batch_size)
        self.softmax_dtype = self.mixed_precision_dtype = None  # _model_call returns fp32 logits
        self.add_bos_token, self.custom_prefix_token_id = None, prefix_token_id
        self.think_end_token, self.enable_thinking, self.chat_template_args = None, None, {}
        self.revision, self.peft, self.delta = None, None, None
        self.progress: Optional[Progress] = None  # set by `seqmix eval` for its progress bar
        self._done = self._total = 0

    # -- what HFLM calls ------------------------------------------------------------------------------
    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Logits [B, T, vocab] (fp32) of a right-padded batch; causal, so padding never reaches real positions."""
        with torch.inference_mode():
            logits = self._model(inps.to(self._device)).float()
        self._advance(inps.shape[0])
        return logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], attention_mask=None,
                        **generation_kwargs) -> torch.Tensor:
        """[B, T + N]: the left-padded context, then up to max_length - T new tokens per row (EOS-padded)."""
        B, T = context.shape
        mask = torch.ones_like(context) if attention_mask is None else attention_mask.clone()
        context = context.clone()
        empty = mask.sum(1) == 0
        context[empty, -1], mask[empty, -1] = self.eot_token_id, 1  # an empty prompt conditions on EOS
        sampling = _sampling(generation_kwargs)
        stops = [s for s in stop if s]
        rows: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        eos = self.eot_token_id

        def watch(i: int, tokens_B: torch.Tensor) -> None:
            for b, t in enumerate(tokens_B.tolist()):
                if done[b]:
                    continue
                rows[b].append(t)
                done[b] = t == eos or any(s in self.tokenizer.decode(rows[b], skip_special_tokens=True)
                                          for s in stops)
            if all(done):
                raise _AllStopped

        try:
            new = self._model.generate(context.to(self._device), attention_mask=mask.to(self._device),
                                       max_new_tokens=max(0, max_length - T), eos_token_id=eos, callback=watch,
                                       cuda_graph=self.cuda_graph, **sampling).cpu()
        except _AllStopped:
            width = max(len(r) for r in rows)
            new = torch.tensor([r + [eos] * (width - len(r)) for r in rows], dtype=torch.int64)
        self._advance(B)
        return torch.cat([context.cpu(), new], dim=1)

    # -- progress --------------------------------------------------------------------------------------
    def _run(self, method, requests, disable_tqdm: bool):
        self._done, self._total = 0, len(requests)
        if self.progress is not None:
            self.progress(0, self._total)
        out = method(requests, disable_tqdm=disable_tqdm or self.progress is not None)
        if self.progress is not None:
            self.progress(self._total, self._total)
        return out

    def _advance(self, n: int) -> None:
        self._done = min(self._total, self._done + n)
        if self.progress is not None:
            self.progress(self._done, self._total)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._run(super().loglikelihood, requests, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._run(super().loglikelihood_rolling, requests, disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._run(super().generate_until, requests, disable_tqdm)

    def get_model_info(self) -> dict:
        """What results.json records about the model (no hub lookups)."""
        return {"model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                "model_dtype": self.dtype_name, "model_spec": self._config.spec, "tokenizer": self.tokenizer_id}


def _length_limit(model, max_length: Optional[int]) -> int:
    """Tokens per request: `max_length`, default 2048, or less for a model whose KV cache ends at config.max_seqlen
    (seqmix refuses to decode past it; recurrent and windowed states take any length)."""
    cache = any(b.mixer.state_kind == "cache" for b in model.blocks)
    limit = model.config.max_seqlen if cache else None
    if max_length is None:
        return min(DEFAULT_MAX_LENGTH, limit) if limit else DEFAULT_MAX_LENGTH
    if limit and int(max_length) > limit:
        raise ValueError(f"max_length={max_length} exceeds the {limit} tokens this model's attention blocks keep a "
                         f"KV cache for (config.max_seqlen); pass max_length <= {limit}")
    return int(max_length)


def _dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _sampling(kwargs: dict) -> dict:
    """lm-eval generation kwargs -> seqmix.generate's sampling arguments (greedy unless do_sample)."""
    kwargs = dict(kwargs)
    do_sample = kwargs.pop("do_sample", False)
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    top_k, top_p = int(kwargs.pop("top_k", 0) or 0), float(kwargs.pop("top_p", 1.0) or 1.0)
    seed = kwargs.pop("seed", None)
    if kwargs:
        raise ValueError(f"the seqmix model does not support generation kwargs {sorted(kwargs)}; it supports "
                         f"do_sample, temperature, top_k, top_p, seed")
    if not do_sample or temperature == 0.0:
        return {"temperature": 0.0}
    return {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
