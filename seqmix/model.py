"""HybridLM: embedding -> pre-norm residual blocks (any registered mixers) -> final norm -> tied LM head."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from seqmix.config import ModelConfig
from seqmix.mixer import BlockContext, Mixer, State
from seqmix_kernels.backend import triton_unavailable
from seqmix_kernels.cross_entropy import cross_entropy_fn, linear_cross_entropy_ref
from seqmix_kernels.rmsnorm import rms_norm_ref, rms_norm_residual_fn, rms_norm_residual_ref

States = list[State]  # one entry per block


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * w, computed in fp32, returned in the weight's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_ref(x, self.weight, self.eps).to(self.weight.dtype)


def fused_impl(device: torch.device) -> str:
    """The block-boundary norm and the LM-head loss for weights on `device`: "triton" (the fused kernels of
    seqmix_kernels, as torch.library custom ops) on a CUDA device with triton, else "reference" (PyTorch)."""
    return "triton" if device.type == "cuda" and triton_unavailable(device) is None else "reference"


class Block(nn.Module):
    """One residual branch, entered at the block boundary: residual += the previous branch's output (fp32), then
    y = norm(residual), out = mixer(y). The residual stream stays fp32; the add and the norm are one fused op
    (`rms_norm_residual`, chosen by HybridLM for its device), so each boundary reads and writes the stream once.
    The unit `HybridLM.compile_blocks` compiles (and the one decode builds on: `step` has the same shape)."""

    def __init__(self, mixer: Mixer, d_model: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.mixer = mixer
        self.norm_residual = rms_norm_residual_ref  # HybridLM.select_impls sets the device's choice

    def enter(self, branch, residual):
        """(y = norm(residual + branch) in the norm weight's dtype, the new fp32 residual); branch None: no add."""
        return self.norm_residual(branch, residual, self.norm.weight, self.norm.eps)

    def forward(self, branch_BTD: Optional[torch.Tensor], residual_BTD: torch.Tensor, state: State = None,
                return_state: bool = False):
        """(mixer output, new residual) [B, T, D] each, plus the mixer's state with return_state. branch_BTD:
        the previous block's output, or None for the first block (residual_BTD is then the embedding)."""
        y_BTD, residual_BTD = self.enter(branch_BTD, residual_BTD)
        if return_state:
            out, state = self.mixer(y_BTD, state=state, return_state=True)
            return out, residual_BTD, state
        return self.mixer(y_BTD, state=state), residual_BTD

    def prefill(self, branch_BTD, residual_BTD, state: State):
        y_BTD, residual_BTD = self.enter(branch_BTD, residual_BTD)
        return self.mixer.prefill(y_BTD, state), residual_BTD

    def step(self, branch_BD, residual_BD, state: State):
        """One token: (mixer output [B, D], new residual [B, D], state)."""
        y_BD, residual_BD = self.enter(branch_BD, residual_BD)
        h, state = self.mixer.step(y_BD, state)
        return h, residual_BD, state


class HybridLM(nn.Module):
    """A language model whose blocks are the layers of `config.spec`, in order."""

    def __init__(self, config: ModelConfig, registry=None):
        super().__init__()
        from seqmix.registry import load_registry

        registry = registry or load_registry()
        self.config = config
        self.registry = registry
        self.layer_specs = layers = config.layers(registry)
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
        self.fused, self.norm_residual, self.cross_entropy = "reference", rms_norm_residual_ref, linear_cross_entropy_ref
        self._select_fused(self.embed.weight.device)

    # -- forward ----------------------------------------------------------------------------------
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """The LM head: logits [..., vocab_size] over the real vocabulary (never the padded tail) from final-normed
        hidden states [..., D]. Every path to logits (forward, step, generate, seqmix.hf) goes through it."""
        return F.linear(h_BTD, self.head_weight())[..., : self.config.vocab_size]

    def hidden(self, tokens_BT: torch.Tensor, states: Optional[States] = None, return_states: bool = False):
        """Final-normed hidden states [B, T, D] (and the per-block states if asked)."""
        residual_BTD = self.embed(tokens_BT).float()
        branch_BTD = None
        new_states: States = []
        for i, block in enumerate(self.blocks):
            st = None if states is None else states[i]
            if return_states:
                branch_BTD, residual_BTD, st = block(branch_BTD, residual_BTD, st, True)
                new_states.append(st)
            else:
                branch_BTD, residual_BTD = block(branch_BTD, residual_BTD, st)
        h_BTD = self.final_norm(branch_BTD, residual_BTD)
        return (h_BTD, new_states) if return_states else h_BTD

    def final_norm(self, branch, residual) -> torch.Tensor:
        """norm_f(residual + the last block's output), fused like every block boundary."""
        return self.norm_residual(branch, residual, self.norm_f.weight, self.norm_f.eps)[0]

    def forward(
        self, tokens_BT: torch.Tensor, states: Optional[States] = None, return_states: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, States]]:
        """Logits [B, T, vocab_size] over the real vocabulary (the padded tail is never returned).

        With `states` (from init_states or a previous call) the sequence continues; with
        return_states=True every block's state after the last token is returned too (prefill).
        """
        out = self.hidden(tokens_BT, states, return_states)
        h_BTD, new_states = out if return_states else (out, None)
        logits = self.logits(h_BTD)
        return (logits, new_states) if return_states else logits

    def loss(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor, ignore_index: int = -100, *,
             logits_BTV: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean next-token cross-entropy in fp32; targets are already shifted by the caller (targets_BT[:, t] is
        the token after tokens_BT[:, t]). `logits_BTV`: the logits of `tokens_BT` when the caller has them.
        Without them the loss comes from the hidden states and the head directly (`cross_entropy`: on CUDA the
        Triton kernel, which never holds the fp32 logits; else the full logits, upcast to fp32)."""
        if logits_BTV is not None:
            return F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), ignore_index=ignore_index)
        return self.cross_entropy(self.hidden(tokens_BT), self.head_weight(), targets_BT,
                                  vocab_size=self.config.vocab_size, ignore_index=ignore_index)

    def compile_blocks(self, **compile_kwargs) -> None:
        """torch.compile every block (the fused boundary and its mixer; the Triton kernels are custom ops, so
        a block is one graph). Blocks of the same mixer and shapes share one compiled graph."""
        for block in self.blocks:
            block.compile(**compile_kwargs)

    def select_impls(self, fused: Optional[str] = None) -> None:
        """Re-resolve every `auto` implementation against where the weights are now (`.to()` does this itself;
        for loaders that assign parameters in place). `fused`: "triton" or "reference" to force the block
        boundaries and the loss (tests run the Triton ones on CPU under Triton's interpreter); default by device."""
        for block in self.blocks:
            block.mixer.select_impls()
        self._select_fused(self.embed.weight.device, fused)

    def _select_fused(self, device: torch.device, impl: Optional[str] = None) -> None:
        """Point every block boundary and the loss at the fused kernels or their references (`fused_impl`)."""
        if impl is None:
            impl = fused_impl(device) if device.type != "meta" else "reference"
        self.norm_residual = fn = rms_norm_residual_fn(impl)
        for block in self.blocks:
            block.norm_residual = fn
        self.cross_entropy = cross_entropy_fn(impl)
        self.fused = impl

    def _apply(self, fn, recurse: bool = True):
        """Moving the model (`.to`, `.cuda`) re-points the fused ops for the new device."""
        out = super()._apply(fn, recurse)
        if "fused" in self.__dict__:
            self._select_fused(self.embed.weight.device)
        return out

    # -- decoding ---------------------------------------------------------------------------------
    def prefill(self, tokens_BT: torch.Tensor, states: States) -> torch.Tensor:
        """The first chunk of fresh sequences: fills `states` (fresh, from init_states) in place, each mixer on
        its fresh fast path (`Mixer.prefill`); returns the final-normed hidden states [B, T, D] (`logits(h)`)."""
        residual_BTD, branch_BTD = self.embed(tokens_BT).float(), None
        for block, st in zip(self.blocks, states):
            branch_BTD, residual_BTD = block.prefill(branch_BTD, residual_BTD, st)
        return self.final_norm(branch_BTD, residual_BTD)

    def init_states(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> States:
        dtype = dtype or self.embed.weight.dtype
        device = device or self.embed.weight.device
        return [b.mixer.init_state(batch_size, max_seqlen=max_seqlen, device=device, dtype=dtype)
                for b in self.blocks]

    def step(self, token_B: torch.Tensor, states: States) -> tuple[torch.Tensor, States]:
        """One token per sequence: logits [B, vocab_size]; states are updated (in place where possible)."""
        residual_BD, branch_BD = self.embed(token_B).float(), None
        new_states = []
        for block, st in zip(self.blocks, states):
            branch_BD, residual_BD, st = block.step(branch_BD, residual_BD, st)
            new_states.append(st)
        return self.logits(self.final_norm(branch_BD, residual_BD)), new_states

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

