"""transformers integration: `import seqmix.hf` registers seqmix with AutoConfig / AutoModelForCausalLM.

After the import, a directory written by `seqmix.io.save` loads with
`AutoModelForCausalLM.from_pretrained(dir)` and transformers' own `generate` runs on it (greedy, sampling,
beam search, left-padded batches). The wrapper holds the HybridLM as `.model`; its states travel between
generate's forward calls in a `SeqmixCache`, one seqmix state per block, allocated once for the whole
generation (`_prepare_cache_for_generation` knows the final length). Decode steps (one token with a cache)
go through `HybridLM.step`, CUDA-graphed on a GPU; prefill through the parallel forward with the states
returned.

Left padding is exact: rows with the same number of real tokens are run as one unpadded batch, so no pad
token ever enters a state (the outputs at padded positions are zeros). This module imports transformers;
`import seqmix` alone does not.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
import transformers
from packaging.version import Version

if Version(transformers.__version__) < Version("5.24"):  # generate passes the cache as `cache` from 5.24 on
    raise ImportError(f"seqmix.hf needs transformers >= 5.24, found {transformers.__version__}: "
                      f"pip install -U 'transformers>=5.24'")

from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel  # noqa: E402
from transformers.cache_utils import Cache  # noqa: E402
from transformers.modeling_outputs import ModelOutput  # noqa: E402

from seqmix.config import ModelConfig  # noqa: E402
from seqmix.model import HybridLM  # noqa: E402

__all__ = ["SeqmixConfig", "SeqmixForCausalLM", "SeqmixCache", "SeqmixCausalLMOutput", "register"]

class SeqmixConfig(PreTrainedConfig):
    """A seqmix ModelConfig as a transformers config (the same keys in config.json, model_type "seqmix");
    the fields below mirror seqmix.config.ModelConfig (tests/test_hf.py checks they round-trip)."""

    model_type = "seqmix"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads"}

    spec: str = "mlp"
    d_model: int = 1024
    n_heads: int = 16
    vocab_size: int = 50257
    pad_vocab_multiple: int = 8
    max_seqlen: int = 2048
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = True

    def __post_init__(self, **kwargs):
        kwargs.pop("seqmix_version", None)  # written by seqmix.io.save for the record
        self.tie_word_embeddings = self.tie_embeddings
        super().__post_init__(**kwargs)

    @property
    def num_hidden_layers(self) -> int:
        from seqmix.spec import parse_spec

        return len(parse_spec(self.spec))

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})

    @classmethod
    def from_model_config(cls, config: ModelConfig) -> "SeqmixConfig":
        return cls(**config.to_dict())


class SeqmixCache(Cache):
    """seqmix's per-block states for transformers' generate: allocated once for `max_length` tokens.

    `states[i]` is block i's state (a dict of tensors with the batch first, or None for stateless blocks).
    On CUDA (cuda_graph=None means: when the model is on a GPU) the one-token decode step is captured in a
    CUDA graph over these buffers, as seqmix's own generate does; prefill results are copied into them and
    beam reordering permutes them in place. `get_seq_length()` counts the tokens seen so far.
    """

    is_compileable = False

    def __init__(self, model: HybridLM, batch_size: int, max_length: int, *, cuda_graph: Optional[bool] = None):
        super().__init__(layers=[])
        from seqmix.generate import DecodeStep, check_length

        check_length(model, max_length, 0)
        on_cuda = model.embed.weight.device.type == "cuda"
        cuda_graph = on_cuda if cuda_graph is None else cuda_graph
        self.decoder: Optional[DecodeStep] = None
        if cuda_graph:  # the decode step is captured once, over this cache's own state buffers
            with torch.no_grad():
                self.decoder = DecodeStep(model, batch_size, max_length, cuda_graph=True)
            self.states = self.decoder.states
        else:
            self.states = model.init_states(batch_size, max_length)
        self.max_length = max_length
        self.seen_tokens = 0

    def step(self, token_B: torch.Tensor) -> torch.Tensor:
        """One decode step for every row (states updated in place); logits [B, vocab_size]."""
        return self.decoder(token_B).clone()  # a graph returns its static output buffer

    def update_states(self, new_states: list) -> None:
        """Make `new_states` (returned by a forward) the cache's states (copied into a graph's buffers)."""
        if self.decoder is None:
            self.states = new_states
            return
        for old, new in zip(self.states, new_states):
            for k, v in (old or {}).items():
                if new[k] is not v:
                    v.copy_(new[k])

    def __len__(self) -> int:
        return len(self.states)

    def __repr__(self) -> str:
        return f"SeqmixCache(blocks={len(self.states)}, seen_tokens={self.seen_tokens}, max_length={self.max_length})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return self.max_length

    @property
    def batch_size(self) -> int:
        return next((v.shape[0] for s in self.states if s for v in s.values()), 0)

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def is_croppable(self) -> bool:
        return False  # recurrent states cannot drop their last tokens (assisted decoding needs that)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.states)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.states)  # so generate slices input_ids by get_seq_length()

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.states)

    def _map(self, fn) -> None:
        """Replace every state tensor by fn(tensor); a CUDA graph captured over the old buffers is dropped."""
        self.decoder = None
        for s in self.states:
            for k, v in (s or {}).items():
                s[k] = fn(v)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row b of every state becomes row beam_idx[b] (in place, so a captured graph stays valid)."""
        for s in self.states:
            for v in (s or {}).values():
                v.copy_(v.index_select(0, beam_idx.to(v.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda v: v.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda v: v[indices.to(v.device)])

    def reset(self) -> None:
        for s in self.states:
            for v in (s or {}).values():
                v.zero_()
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("seqmix states are recurrent and cannot be cropped; assisted decoding and "
                                  "other modes that roll the cache back are not supported")


@dataclass
class SeqmixCausalLMOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    cache: Optional[SeqmixCache] = None


class SeqmixForCausalLM(PreTrainedModel, GenerationMixin):
    """transformers' face of a HybridLM (`.model`): forward with labels / cache, generate, save_pretrained."""

    config_class = SeqmixConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: SeqmixConfig, model: Optional[HybridLM] = None):
        super().__init__(config)
        self.model = model if model is not None else HybridLM(config.to_model_config())
        self.post_init()

    @classmethod
    def from_hybrid(cls, model: HybridLM) -> "SeqmixForCausalLM":
        """Wrap an existing HybridLM (shares its parameters)."""
        return cls(SeqmixConfig.from_model_config(model.config), model=model)

    def _init_weights(self, module) -> None:
        pass  # HybridLM initialises its own parameters; loaded checkpoints overwrite them

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.lm_head  # None when tied (the head is the embedding)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # seqmix brings its own cache (below)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, generation_mode,
                                      batch_size: int, max_cache_length: int) -> None:
        if model_kwargs.get("cache") is not None or generation_config.use_cache is False:
            return
        rows = max(generation_config.num_beams, generation_config.num_return_sequences) * batch_size
        model_kwargs["cache"] = SeqmixCache(self.model, rows, max_cache_length + 1)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[SeqmixCache] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int = 0,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> SeqmixCausalLMOutput:
        """input_ids [B, T] (left padding marked by attention_mask [B, T_total] = 0); logits [B, T', vocab].

        With a SeqmixCache the sequence continues from it (and it is updated in place); with use_cache=True
        and no cache one is made for exactly these tokens. `labels` [B, T] give the mean next-token loss
        (shifted here, -100 ignored). `logits_to_keep=k` returns the last k positions only (0 = all).
        """
        for name in ("inputs_embeds", "output_attentions", "output_hidden_states"):
            if kwargs.get(name):
                raise ValueError(f"SeqmixForCausalLM does not support {name}")
        B, T = input_ids.shape
        if cache is None and use_cache:
            cache = SeqmixCache(self.model, B, T)
        mask_BT = None if attention_mask is None else attention_mask[:, -T:]
        if mask_BT is not None and bool(mask_BT.all()):
            mask_BT = None
        if cache is not None and T == 1 and cache.seen_tokens > 0 and mask_BT is None:
            if cache.decoder is not None:
                h_logits = cache.step(input_ids[:, 0])[:, None]  # CUDA-graphed on GPU
            else:
                logits, cache.states = self.model.step(input_ids[:, 0], cache.states)
                h_logits = logits[:, None]
        else:
            states = None if cache is None else cache.states
            if mask_BT is None:
                h = self.model.hidden(input_ids, states, return_states=cache is not None)
                h_BTD, new = h if cache is not None else (h, None)
            else:
                h_BTD, new = self._hidden_left_padded(input_ids, mask_BT, states, cache)
            if cache is not None:
                cache.update_states(new)
            h_BTD = h_BTD[:, -logits_to_keep:] if logits_to_keep else h_BTD
            h_logits = torch.nn.functional.linear(h_BTD, self.model.head_weight())[..., : self.config.vocab_size]
        if cache is not None:
            cache.seen_tokens += T
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                h_logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return SeqmixCausalLMOutput(loss=loss, logits=h_logits, cache=cache)

    def _hidden_left_padded(self, ids_BT, mask_BT, states, cache):
        """Hidden states [B, T, D] of a left-padded batch (zeros at pads), one unpadded forward per length."""
        if cache is not None and cache.seen_tokens > 0:
            raise ValueError("padding in a continuation is not supported: pad prompts on the left, before the "
                             "first forward")
        from seqmix.generate import left_pad_lengths, prefill_chunks

        B, T = ids_BT.shape
        rows = [ids_BT[b, T - n:] for b, n in enumerate(left_pad_lengths(mask_BT))]
        h_BTD = torch.zeros(B, T, self.config.d_model, device=ids_BT.device, dtype=self.model.embed.weight.dtype)
        for idx_G, t0, L, h_GtD in prefill_chunks(self.model, rows, states, max_tokens=B * T):  # one forward per L
            h_BTD[idx_G, T - L + t0:T - L + t0 + h_GtD.shape[1]] = h_GtD.to(h_BTD.dtype)
        return h_BTD, states

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write seqmix's own format (loadable by seqmix.io.load and by AutoModelForCausalLM)."""
        unsupported = sorted(k for k, v in kwargs.items() if v and k not in ("safe_serialization", "max_shard_size"))
        if unsupported:
            raise ValueError(f"SeqmixForCausalLM.save_pretrained does not support {unsupported}")
        from seqmix.io import save

        save(self.model, save_directory, **({"max_shard_size": kwargs["max_shard_size"]}
                                                       if kwargs.get("max_shard_size") else {}))


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know model_type "seqmix" (idempotent)."""
    AutoConfig.register("seqmix", SeqmixConfig, exist_ok=True)
    AutoModelForCausalLM.register(SeqmixConfig, SeqmixForCausalLM, exist_ok=True)


register()
