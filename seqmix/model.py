"""HybridLM: embedding -> pre-norm residual blocks (any registered mixers) -> final norm -> tied LM head."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from seqmix.config import ModelConfig
from seqmix.mixer import BlockContext, Mixer, State
from seqmix_kernels.rmsnorm import rms_norm_ref

States = list[State]  # one entry per block


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * w, computed in fp32, returned in the weight's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_ref(x, self.weight, self.eps).to(self.weight.dtype)


class Block(nn.Module):
    """One residual branch: x = x + mixer(norm(x)); the residual stream x stays fp32."""

    def __init__(self, mixer: Mixer, d_model: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.mixer = mixer

    def forward(self, x_BTD: torch.Tensor, state: State = None, return_state: bool = False):
        out = self.mixer(self.norm(x_BTD), state=state, return_state=return_state)
        if return_state:
            h, state = out
            return x_BTD + h.float(), state
        return x_BTD + out.float()

    def step(self, x_BD: torch.Tensor, state: State):
        h, state = self.mixer.step(self.norm(x_BD), state)
        return x_BD + h.float(), state


class HybridLM(nn.Module):
    """A language model whose blocks are the layers of `config.spec`, in order."""

    def __init__(self, config: ModelConfig, registry=None):
        super().__init__()
        from seqmix.registry import load_registry
        from seqmix.spec import parse_spec

        registry = registry or load_registry()
        self.config = config
        self.registry = registry
        self.layer_specs = layers = parse_spec(config.spec, registry)
        D = config.d_model
        self.embed = nn.Embedding(config.padded_vocab_size, D)
        nn.init.normal_(self.embed.weight, std=config.init_std)
        blocks = []
        for i, layer in enumerate(layers):
            ctx = BlockContext(d_model=D, n_heads=config.n_heads, layer_idx=i, n_blocks=len(layers),
                               init_std=config.init_std)
            blocks.append(Block(registry.get(layer.name)(ctx, **layer.kwargs), D, config.norm_eps))
        self.blocks = nn.ModuleList(blocks)
        self.norm_f = RMSNorm(D, config.norm_eps)
        if config.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(D, config.padded_vocab_size, bias=False)
            nn.init.normal_(self.lm_head.weight, std=config.init_std)

    # -- forward ----------------------------------------------------------------------------------
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def hidden(self, tokens_BT: torch.Tensor, states: Optional[States] = None, return_states: bool = False):
        """Final-normed hidden states [B, T, D] (and the per-block states if asked)."""
        x_BTD = self.embed(tokens_BT).float()
        new_states: States = []
        for i, block in enumerate(self.blocks):
            st = None if states is None else states[i]
            if return_states:
                x_BTD, st = block(x_BTD, st, True)
                new_states.append(st)
            else:
                x_BTD = block(x_BTD, st)
        h_BTD = self.norm_f(x_BTD)
        return (h_BTD, new_states) if return_states else h_BTD

    def forward(
        self, tokens_BT: torch.Tensor, states: Optional[States] = None, return_states: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, States]]:
        """Logits [B, T, vocab_size] over the real vocabulary (the padded tail is never returned).

        With `states` (from init_states or a previous call) the sequence continues; with
        return_states=True every block's state after the last token is returned too (prefill).
        """
        out = self.hidden(tokens_BT, states, return_states)
        h_BTD, new_states = out if return_states else (out, None)
        logits = F.linear(h_BTD, self.head_weight())[..., : self.config.vocab_size]
        return (logits, new_states) if return_states else logits

    def loss(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy (targets already shifted by the caller), computed in fp32."""
        logits = self(tokens_BT)
        return F.cross_entropy(logits.float().flatten(0, 1), targets_BT.flatten(), ignore_index=ignore_index)

    # -- decoding ---------------------------------------------------------------------------------
    def init_states(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> States:
        dtype = dtype or self.embed.weight.dtype
        device = device or self.embed.weight.device
        return [b.mixer.init_state(batch_size, max_seqlen=max_seqlen, device=device, dtype=dtype)
                for b in self.blocks]

    def step(self, token_B: torch.Tensor, states: States) -> tuple[torch.Tensor, States]:
        """One token per sequence: logits [B, vocab_size]; states are updated (in place where possible)."""
        x_BD = self.embed(token_B).float()
        new_states = []
        for block, st in zip(self.blocks, states):
            x_BD, st = block.step(x_BD, st)
            new_states.append(st)
        logits = F.linear(self.norm_f(x_BD), self.head_weight())[..., : self.config.vocab_size]
        return logits, new_states

    def generate(self, input_ids, **kwargs) -> torch.Tensor:
        """New tokens [B, N] continuing each prompt: prefill, then decode steps (CUDA-graphed on GPU).
        Arguments (max_new_tokens, temperature, top_k, top_p, eos_token_id, seed, ...): seqmix.generate.generate."""
        from seqmix.generate import generate

        return generate(self, input_ids, **kwargs)

    # -- accounting -------------------------------------------------------------------------------
    def block_rows(self, seqlen: int, state_dtype: torch.dtype = torch.bfloat16) -> list[dict]:
        """Per block: index, canonical spec, parameters, state bytes per sequence at `seqlen`, FLOPs/token."""
        from seqmix.spec import format_spec

        return [
            dict(index=i, mixer=format_spec([layer], self.registry), kind=b.mixer.state_kind,
                 params=sum(p.numel() for p in b.parameters()),
                 state_bytes=b.mixer.state_bytes(1, seqlen, state_dtype),
                 flops_per_token=b.mixer.flops_per_token(seqlen))
            for i, (layer, b) in enumerate(zip(self.layer_specs, self.blocks))
        ]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_bytes(self, batch_size: int, seqlen: int, dtype: torch.dtype = torch.bfloat16) -> int:
        return sum(b.mixer.state_bytes(batch_size, seqlen, dtype) for b in self.blocks)

    def flops_per_token(self, seqlen: int) -> int:
        """Forward FLOPs per token at context `seqlen`, the LM head included (2 per multiply-add)."""
        head = 2 * self.config.d_model * self.config.padded_vocab_size
        return head + sum(b.mixer.flops_per_token(seqlen) for b in self.blocks)


def sequence_mixer_count(model: HybridLM) -> int:
    """Blocks that mix along time (state kind other than "none"): the depth of a comparable attention stack."""
    return sum(b.mixer.state_kind != "none" for b in model.blocks)


def attention_kv_bytes(config: ModelConfig, depth: int, seqlen: int, bytes_per_elem: int = 2) -> int:
    """Bytes of the KV cache an all-attention stack of this width and `depth` holds per sequence at `seqlen`."""
    return depth * 2 * seqlen * config.d_model * bytes_per_elem


def build_model(config: ModelConfig, *, device: Union[str, torch.device] = "cpu", dtype=None, registry=None) -> HybridLM:
    """Construct on `device` ("meta" for counting without allocating) and cast to `dtype` if given."""
    with torch.device(device):
        model = HybridLM(config, registry)
    return model.to(dtype) if dtype is not None else model

