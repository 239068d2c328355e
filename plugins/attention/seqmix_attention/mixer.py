"""`attn`: causal softmax attention with RoPE and grouped KV heads, decoded from a preallocated KV cache."""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from seqmix.mixer import Arg, ArgError, BlockContext, Impl, Mixer, State, resolve_heads, triton_kernel
from seqmix_kernels.decode_attention import decode_attention_fn
from seqmix_kernels.rotary import check_rotary_dim, rotary_fn


class AttnOps(NamedTuple):
    """What an impl gives the mixer: the rotary op, and the decode step's attention (None: masked SDPA)."""

    rotary: Callable
    decode: Optional[Callable]


def _load_kernels() -> AttnOps:
    return AttnOps(rotary_fn("triton"), decode_attention_fn("triton"))  # import triton: only when chosen


def _fits_decode_kernel(m) -> Optional[str]:
    return None if m.head_dim <= 256 else f"the decode kernel supports head dims up to 256, this layer has {m.head_dim}"


# impl -> AttnOps: the Triton rotary and the split-K decode kernel over each sequence's cached rows, or the PyTorch
# rotary and SDPA over the whole cache, masked. A fresh sequence (training, prefill) runs SDPA's causal kernel on both.
IMPLS = {"triton": Impl("kernel", triton_kernel, load=_load_kernels, fits=_fits_decode_kernel),
         "reference": Impl("reference", load=lambda: AttnOps(rotary_fn("reference"), None))}


def _capturing() -> bool:
    """True inside CUDA-graph capture or torch.compile tracing, where host-side checks cannot run."""
    compiling = hasattr(torch, "compiler") and torch.compiler.is_compiling()
    return compiling or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


class CausalAttention(Mixer):
    """Multi-head causal softmax attention; `kv_heads < heads` shares each K/V head among heads/kv_heads
    consecutive query heads (GQA; query head h reads kv head h // (heads/kv_heads)).

    Parameters: `Wqkv` (d -> (heads + 2 kv_heads) * Dh, layout [Q | K | V]) and `out_proj` (d -> d), no
    biases, Dh = d / heads; RoPE (rotate-half, base `rope_base`) on the first 2*ceil(R/2) channels of q, k
    (R = `rotary_dim`, flash-attn's convention).
    Decode state, preallocated for `max_seqlen` tokens:
        {"k": [B, max_seqlen, Hkv, Dc], "v": [B, max_seqlen, Hkv, Dc], "pos": int64 [B]}
    where token p of sequence b (keys stored after rotary) sits at row p; pos = tokens cached so far; Dc = Dh
    rounded up to a multiple of 8 (attn-1b's 70 -> 72: rows the decode kernel loads in 16-byte vectors), the
    padding columns kept zero.
    impl="triton" runs the rotary with its Triton kernel and `step`'s attention with the split-K decode kernel
    (`seqmix_kernels.decode_attention`), which reads rows [0, pos] of each sequence only and the grouped KV heads
    once; impl="reference" attends over the whole cache with a mask (SDPA). Training, `prefill` and a forward
    that continues a state use SDPA on both.
    """

    name = "attn"
    impls = IMPLS
    description = "causal softmax attention with RoPE and grouped KV heads; KV-cache state"
    spec_args = (
        Arg("heads", int, None, min=1, help="query heads; default the model's n_heads"),
        Arg("kv_heads", int, None, min=1, help="key/value heads (must divide heads); default heads"),
        Arg("rotary_dim", int, None, min=0, positional=False,
            help="RoPE dim R per head, as flash-attn's RotaryEmbedding(dim=R): rotates 2*ceil(R/2) channels "
                 "(R = 35 rotates 36); default the full head dim"),
        Arg("rope_base", float, 10000.0, min=1.0, positional=False, help="RoPE frequency base"),
        Arg("impl", str, "auto", choices=("auto", *IMPLS), positional=False,
            help="triton = the rotary and decode-step attention kernels (fresh sequences use SDPA on both); "
                 "auto = triton for a layer on a CUDA device"),
    )
    state_kind = "cache"

    def __init__(self, ctx: BlockContext, heads: Optional[int] = None, kv_heads: Optional[int] = None,
                 rotary_dim: Optional[int] = None, rope_base: float = 10000.0, impl: str = "auto"):
        super().__init__(ctx)
        D = ctx.d_model
        self.n_heads = resolve_heads(ctx, heads, D)
        self.n_kv_heads = self.n_heads if kv_heads is None else kv_heads
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ArgError(f"kv_heads={self.n_kv_heads} must divide heads={self.n_heads}")
        self.head_dim = D // self.n_heads
        self.cache_dim = -(-self.head_dim // 8) * 8
        try:
            self.rotary_dim = check_rotary_dim(-1 if rotary_dim is None else rotary_dim, self.head_dim)
        except ValueError as e:
            raise ArgError(str(e)) from None
        self.rope_base = float(rope_base)
        H, Hkv, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        self.Wqkv = nn.Linear(D, (H + 2 * Hkv) * Dh, bias=False)  # D -> [Q (H heads) | K (Hkv) | V (Hkv)]
        self.out_proj = nn.Linear(D, D, bias=False)
        nn.init.normal_(self.Wqkv.weight, std=ctx.init_std)
        nn.init.normal_(self.out_proj.weight, std=ctx.out_init_std)

    # -- projections and attention ----------------------------------------------------------------
    def _qkv(self, x_BTD: torch.Tensor, pos: Union[int, torch.Tensor]):
        """q [B, T, H, Dh], k and v [B, T, Hkv, Dh] at positions pos + t, RoPE applied to q and k."""
        B, T, _ = x_BTD.shape
        H, Hkv, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        q_BTHD, k_BTKD, v_BTKD = self.Wqkv(x_BTD).split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
        rotary = self.ops["impl"].rotary
        q_BTHD = rotary(q_BTHD.view(B, T, H, Dh), pos, self.rotary_dim, self.rope_base)
        k_BTKD = rotary(k_BTKD.view(B, T, Hkv, Dh), pos, self.rotary_dim, self.rope_base)
        return q_BTHD, k_BTKD, v_BTKD.view(B, T, Hkv, Dh)

    def _sdpa(self, q_BTHD, k_BSKD, v_BSKD, mask_B1TS=None) -> torch.Tensor:
        """Softmax attention with each kv head repeated for its group; causal when no mask is given."""
        G = self.n_heads // self.n_kv_heads
        if G > 1:
            k_BSKD, v_BSKD = k_BSKD.repeat_interleave(G, dim=2), v_BSKD.repeat_interleave(G, dim=2)
        o_BHTD = F.scaled_dot_product_attention(
            q_BTHD.transpose(1, 2), k_BSKD.transpose(1, 2), v_BSKD.transpose(1, 2),
            attn_mask=mask_B1TS, is_causal=mask_B1TS is None,
        )
        return o_BHTD.transpose(1, 2)

    # -- the contract -----------------------------------------------------------------------------
    def forward(self, x_BTD, *, state: State = None, return_state: bool = False):
        B, T, D = x_BTD.shape
        if state is None:
            q_BTHD, k_BTKD, v_BTKD = self._qkv(x_BTD, 0)
            o_BTHD = self._sdpa(q_BTHD, k_BTKD, v_BTKD)
            if return_state:  # a cache of exactly T
                state = self.init_state(B, max_seqlen=T, device=x_BTD.device, dtype=k_BTKD.dtype)
        else:  # attend over [the cached prefix of each sequence | this chunk], masked by absolute position
            pos_B = state["pos"]
            P, S = int(pos_B.max()), state["k"].shape[1]
            if return_state and P + T > S:
                raise RuntimeError(
                    f"attn KV cache overflow: {P} cached + {T} new tokens = {P + T} > max_seqlen {S}; "
                    f"allocate the state with init_state(batch, max_seqlen>={P + T})"
                )
            q_BTHD, k_BTKD, v_BTKD = self._qkv(x_BTD, pos_B)
            qpos_BT = pos_B[:, None] + torch.arange(T, device=pos_B.device)
            cpos_P = torch.arange(P, device=pos_B.device)
            cpos_BP = torch.where(cpos_P < pos_B[:, None], cpos_P, -1)  # rows past a sequence's pos: unused
            kpos_BS = torch.cat([cpos_BP, qpos_BT], 1)
            mask_B1TS = ((kpos_BS[:, None, :] <= qpos_BT[:, :, None]) & (kpos_BS[:, None, :] >= 0))[:, None]
            Dh = self.head_dim
            k_BSKD = torch.cat([state["k"][:, :P, :, :Dh].to(k_BTKD.dtype), k_BTKD], 1)
            v_BSKD = torch.cat([state["v"][:, :P, :, :Dh].to(v_BTKD.dtype), v_BTKD], 1)
            o_BTHD = self._sdpa(q_BTHD, k_BSKD, v_BSKD, mask_B1TS)
        y_BTD = self.out_proj(o_BTHD.reshape(B, T, D))
        if not return_state:
            return y_BTD
        self._write(state, k_BTKD, v_BTKD)
        return y_BTD, state

    def prefill(self, x_BTD, state: State):
        """A fresh sequence on the causal fast path (SDPA is_causal, no mask), its keys written into rows
        [0, T) of the preallocated cache."""
        B, T, D = x_BTD.shape
        if T > state["k"].shape[1]:
            raise RuntimeError(f"attn KV cache overflow: a prefill of {T} tokens > max_seqlen {state['k'].shape[1]}; "
                               f"allocate the state with init_state(batch, max_seqlen>={T})")
        q_BTHD, k_BTKD, v_BTKD = self._qkv(x_BTD, 0)
        y_BTD = self.out_proj(self._sdpa(q_BTHD, k_BTKD, v_BTKD).reshape(B, T, D))
        self._write(state, k_BTKD, v_BTKD)
        return y_BTD

    def _write(self, state: dict, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor) -> None:
        """Store a chunk's keys/values at rows pos .. pos + T - 1 of each sequence and advance pos, in place."""
        B, T = k_BTKD.shape[:2]
        pos_B = state["pos"]
        row_BT = pos_B[:, None] + torch.arange(T, device=pos_B.device)
        b_B1 = torch.arange(B, device=pos_B.device)[:, None]
        state["k"][b_B1, row_BT, :, :self.head_dim] = k_BTKD.to(state["k"].dtype)
        state["v"][b_B1, row_BT, :, :self.head_dim] = v_BTKD.to(state["v"].dtype)
        pos_B.add_(T)

    def init_state(self, batch_size, *, max_seqlen, device=None, dtype=torch.float32):
        shape = (batch_size, max_seqlen, self.n_kv_heads, self.cache_dim)
        return {
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "v": torch.zeros(shape, device=device, dtype=dtype),
            "pos": torch.zeros(batch_size, device=device, dtype=torch.int64),
        }

    def step(self, x_BD, state):
        """One token per sequence: write k/v at row pos, attend over rows <= pos, pos += 1.

        Shapes are fixed (the kernel reads each sequence's length on the device; the reference reads the whole
        cache, masked), so the step can be captured in a CUDA graph; the overflow check is skipped while capturing
        or compiling.
        """
        B, D = x_BD.shape
        pos_B = state["pos"]
        S = state["k"].shape[1]
        if not _capturing() and int(pos_B.max()) >= S:
            raise RuntimeError(
                f"attn KV cache overflow: a step at position {int(pos_B.max())} needs max_seqlen >= "
                f"{int(pos_B.max()) + 1}, but the state holds {S}; allocate a larger one with init_state"
            )
        q_B1HD, k_B1KD, v_B1KD = self._qkv(x_BD[:, None], pos_B)
        b_B = torch.arange(B, device=pos_B.device)
        Dh = self.head_dim
        state["k"][b_B, pos_B, :, :Dh] = k_B1KD[:, 0].to(state["k"].dtype)
        state["v"][b_B, pos_B, :, :Dh] = v_B1KD[:, 0].to(state["v"].dtype)
        kernel = self.ops["impl"].decode
        if kernel is not None:  # rows [0, pos] of each sequence, nothing past them
            o_BHD = kernel(q_B1HD[:, 0], state["k"], state["v"], pos_B + 1)
        else:
            valid_B11S = (torch.arange(S, device=pos_B.device) <= pos_B[:, None])[:, None, None]
            k_BSKD, v_BSKD = (state[n][..., :Dh].to(q_B1HD.dtype) for n in "kv")
            o_BHD = self._sdpa(q_B1HD, k_BSKD, v_BSKD, valid_B11S)[:, 0]
        pos_B.add_(1)
        return self.out_proj(o_BHD.reshape(B, D)), state

    def flops_per_token(self, seqlen: int) -> int:
        """2 per multiply-add: Wqkv (d (H + 2 Hkv) Dh) + out_proj (d^2), then q.k and p.v over the `seqlen`
        keys a token at the end of a `seqlen` context sees (H Dh = d each). Softmax and RoPE are not counted."""
        D, Dh = self.ctx.d_model, self.head_dim
        proj = D * (self.n_heads + 2 * self.n_kv_heads) * Dh + D * D
        return 2 * proj + 2 * 2 * seqlen * D

    @classmethod
    def import_weights(cls, source: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """transformers' LlamaAttention has separate projections: Wqkv = [q_proj | k_proj | v_proj] (rows; the
        K/V blocks have num_key_value_heads heads), out_proj = o_proj. The Based repo's MHA has this mixer's
        names (Wqkv, out_proj)."""
        if source != "llama":
            return super().import_weights(source, tensors)
        return {"Wqkv.weight": torch.cat([tensors[f"{n}_proj.weight"] for n in "qkv"]),
                "out_proj.weight": tensors["o_proj.weight"]}
