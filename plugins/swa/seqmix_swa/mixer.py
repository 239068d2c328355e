"""`swa`: sliding-window causal softmax attention (Based's), decoded from a ring buffer of the last W keys."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from seqmix.mixer import Arg, ArgError, BlockContext, Impl, Mixer, State, resolve_heads, triton_kernel
from seqmix_kernels.decode_attention import decode_attention_fn
from seqmix_kernels.rotary import check_rotary_dim, rotary_fn


class SwaOps(NamedTuple):
    """What an impl gives the mixer: a fresh sequence's attention and the decode step's (None: SDPA with the band /
    ring mask), and the rotary op."""

    fresh: Optional[Callable]
    decode: Optional[Callable]
    rotary: Callable


def _load_kernels() -> SwaOps:
    from seqmix_swa.kernel import swa_attn  # these import triton: only when chosen

    return SwaOps(swa_attn, decode_attention_fn("triton"), rotary_fn("triton"))


# impl -> SwaOps: the banded Triton kernel (a head in one tile), the split-K decode kernel and the Triton rotary, or
# SDPA with masks and the PyTorch rotary.
IMPLS = {"triton": Impl("kernel", triton_kernel, load=_load_kernels, fits=lambda m: None if m.head_dim <= 128 else
                        f"the kernel supports head dims up to 128, this layer has {m.head_dim}"),
         "reference": Impl("reference", load=lambda: SwaOps(None, None, rotary_fn("reference")))}


def ring_positions(pos_B: torch.Tensor, window: int) -> torch.Tensor:
    """Absolute position held by each slot of a W-slot ring buffer after `pos_B` tokens: [B, W], < 0 if empty.

    Token p lives in slot p % W, so slot s holds the latest p < pos with p = s (mod W).
    """
    s_W = torch.arange(window, device=pos_B.device)
    last_B1 = pos_B[:, None] - 1
    return last_B1 - torch.remainder(last_B1 - s_W, window)


def band_mask(qpos_BT: torch.Tensor, kpos_BS: torch.Tensor, window: int) -> torch.Tensor:
    """[B, 1, T, S] boolean mask: True where key position is in (q - window, q] and the key exists (>= 0)."""
    q_BT1, k_B1S = qpos_BT[:, :, None], kpos_BS[:, None, :]
    return ((k_B1S <= q_BT1) & (k_B1S > q_BT1 - window) & (k_B1S >= 0))[:, None]


class SlidingWindowAttention(Mixer):
    """Multi-head softmax attention where each query sees itself and the `window - 1` tokens before it.

    Parameters match the Based checkpoint: `Wqkv` (d -> 3d, layout [Q all heads | K | V]) and `out_proj`
    (d -> d), no biases; RoPE (rotate-half, base 10000) on the first 2*ceil(R/2) channels of q and
    k (R = `rotary_dim`, flash-attn's convention).
    Decode state, constant in the sequence length:
        {"k": [B, W, H, Dh], "v": [B, W, H, Dh], "pos": int64 [B]}
    a ring buffer where token p (keys stored after rotary) sits in slot p % W; pos = tokens seen so far.
    impl="triton" runs the rotary with its Triton kernel, the attention of a fresh sequence (training, and `prefill`)
    with the banded Triton kernel (`seqmix_swa.kernel.swa_attn`, O(T * W)) and `step`'s with the split-K decode kernel
    (`seqmix_kernels.decode_attention`) over the min(pos + 1, W) filled slots; a forward that continues a carried
    state attends over the W ring slots + the new tokens with PyTorch's SDPA on every impl.
    """

    name = "swa"
    impls = IMPLS
    description = "sliding-window causal softmax attention with RoPE; ring-buffer state of the last W keys"
    spec_args = (
        Arg("window", int, 64, min=1, help="keys per query, itself included (swa:129 = Based's window 256)"),
        Arg("heads", int, None, min=1, help="attention heads; default the model's n_heads"),
        Arg("impl", str, "auto", choices=("auto", *IMPLS), positional=False,
            help="attention path of a fresh sequence; auto = the kernel for a layer on a CUDA device"),
        Arg("rotary_dim", int, None, min=0, positional=False,
            help="RoPE dim R per head, as flash-attn's RotaryEmbedding(dim=R): rotates 2*ceil(R/2) channels "
                 "(R = 35 rotates 36); default the full head dim"),
    )
    state_kind = "window"

    def __init__(self, ctx: BlockContext, window: int = 64, heads: Optional[int] = None,
                 impl: str = "auto", rotary_dim: Optional[int] = None):
        super().__init__(ctx)
        D = ctx.d_model
        self.window = window
        self.n_heads = resolve_heads(ctx, heads, D)
        self.head_dim = D // self.n_heads
        try:
            self.rotary_dim = check_rotary_dim(-1 if rotary_dim is None else rotary_dim, self.head_dim)
        except ValueError as e:
            raise ArgError(str(e)) from None
        self.Wqkv = nn.Linear(D, 3 * D, bias=False)  # D -> [Q | K | V], each H heads of Dh
        self.out_proj = nn.Linear(D, D, bias=False)
        nn.init.normal_(self.Wqkv.weight, std=ctx.init_std)
        nn.init.normal_(self.out_proj.weight, std=ctx.out_init_std)

    # -- projections ------------------------------------------------------------------------------
    def _qkv(self, x_BTD: torch.Tensor, pos: Union[int, torch.Tensor]):
        """q, k, v [B, T, H, Dh] for tokens at positions pos + t, RoPE applied to q and k."""
        B, T, _ = x_BTD.shape
        q_BTHD, k_BTHD, v_BTHD = self.Wqkv(x_BTD).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        rotary = self.ops["impl"].rotary
        q_BTHD = rotary(q_BTHD, pos, self.rotary_dim)
        k_BTHD = rotary(k_BTHD, pos, self.rotary_dim)
        return q_BTHD, k_BTHD, v_BTHD

    @staticmethod
    def _sdpa(q_BTHD, k_BSHD, v_BSHD, mask_B1TS) -> torch.Tensor:
        o_BHTD = F.scaled_dot_product_attention(
            q_BTHD.transpose(1, 2), k_BSHD.transpose(1, 2), v_BSHD.transpose(1, 2), attn_mask=mask_B1TS
        )
        return o_BHTD.transpose(1, 2)

    # -- the contract -----------------------------------------------------------------------------
    def forward(self, x_BTD, *, state: State = None, return_state: bool = False):
        B, T, D = x_BTD.shape
        if state is None:  # fresh sequence: the T x T band
            y_BTD, k_BTHD, v_BTHD = self._fresh(x_BTD)
            if not return_state:
                return y_BTD
            state = self.init_state(B, max_seqlen=T, device=x_BTD.device, dtype=k_BTHD.dtype)
        else:  # continue: prepend the ring buffer (W slots), masked by the absolute position of each slot
            W, pos_B = self.window, state["pos"]
            q_BTHD, k_BTHD, v_BTHD = self._qkv(x_BTD, pos_B)
            qpos_BT = pos_B[:, None] + torch.arange(T, device=x_BTD.device)
            kpos_BS = torch.cat([ring_positions(pos_B, W), qpos_BT], 1)  # [B, W + T]
            k_BSHD = torch.cat([state["k"].to(k_BTHD.dtype), k_BTHD], 1)
            v_BSHD = torch.cat([state["v"].to(v_BTHD.dtype), v_BTHD], 1)
            o_BTHD = self._sdpa(q_BTHD, k_BSHD, v_BSHD, band_mask(qpos_BT, kpos_BS, W))
            y_BTD = self.out_proj(o_BTHD.reshape(B, T, D))
            if not return_state:
                return y_BTD
        self._write(state, k_BTHD, v_BTHD)
        return y_BTD, state

    def prefill(self, x_BTD, state: State):
        """A fresh sequence on the fresh path (the banded kernel under impl=triton), its last W keys written
        into the preallocated ring."""
        y_BTD, k_BTHD, v_BTHD = self._fresh(x_BTD)
        self._write(state, k_BTHD, v_BTHD)
        return y_BTD

    def _fresh(self, x_BTD):
        """y [B, T, D] of a sequence from position 0, and its k, v [B, T, H, Dh] (RoPE applied to k)."""
        B, T, D = x_BTD.shape
        q_BTHD, k_BTHD, v_BTHD = self._qkv(x_BTD, 0)
        if self.ops["impl"].fresh is not None:
            o_BTHD = self.ops["impl"].fresh(q_BTHD, k_BTHD, v_BTHD, self.window)
        else:
            t_T = torch.arange(T, device=x_BTD.device)
            o_BTHD = self._sdpa(q_BTHD, k_BTHD, v_BTHD, band_mask(t_T[None], t_T[None], self.window))
        return self.out_proj(o_BTHD.reshape(B, T, D)), k_BTHD, v_BTHD

    def _write(self, state: dict, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor) -> None:
        """Store the last min(T, W) keys/values of a chunk in their ring slots and advance pos, in place."""
        B, T = k_BTHD.shape[:2]
        L = min(T, self.window)
        pos_B = state["pos"]
        slot_BL = torch.remainder(pos_B[:, None] + torch.arange(T - L, T, device=pos_B.device), self.window)
        b_B1 = torch.arange(B, device=pos_B.device)[:, None]
        state["k"][b_B1, slot_BL] = k_BTHD[:, T - L:].to(state["k"].dtype)
        state["v"][b_B1, slot_BL] = v_BTHD[:, T - L:].to(state["v"].dtype)
        pos_B.add_(T)

    def init_state(self, batch_size, *, max_seqlen, device=None, dtype=torch.float32):
        """The ring buffer; its size depends on the window, not on `max_seqlen`."""
        shape = (batch_size, self.window, self.n_heads, self.head_dim)
        return {
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "v": torch.zeros(shape, device=device, dtype=dtype),
            "pos": torch.zeros(batch_size, device=device, dtype=torch.int64),
        }

    def step(self, x_BD, state):
        """One token per sequence: write k/v into slot pos % W, attend over the written slots, pos += 1."""
        B, D = x_BD.shape
        pos_B = state["pos"]
        q_B1HD, k_B1HD, v_B1HD = self._qkv(x_BD[:, None], pos_B)
        b_B = torch.arange(B, device=pos_B.device)
        slot_B = torch.remainder(pos_B, self.window)
        state["k"][b_B, slot_B] = k_B1HD[:, 0].to(state["k"].dtype)
        state["v"][b_B, slot_B] = v_B1HD[:, 0].to(state["v"].dtype)
        # After the write the buffer holds positions pos-W+1..pos, all inside the window, in slots
        # [0, min(pos + 1, W)) (filled in order, then overwritten in place); attention does not care about order.
        if self.ops["impl"].decode is not None:
            filled_B = torch.clamp(pos_B + 1, max=self.window)
            o_BHD = self.ops["impl"].decode(q_B1HD[:, 0], state["k"], state["v"], filled_B)
        else:
            valid_B11W = (ring_positions(pos_B + 1, self.window) >= 0)[:, None, None]
            o_BHD = self._sdpa(q_B1HD, state["k"].to(q_B1HD.dtype), state["v"].to(v_B1HD.dtype), valid_B11W)[:, 0]
        pos_B.add_(1)
        return self.out_proj(o_BHD.reshape(B, D)), state

    def flops_per_token(self, seqlen: int) -> int:
        """2 per multiply-add: Wqkv (3d^2) + out_proj (d^2), then q.k and p.v over min(seqlen, W) keys (d each).

        Softmax, RoPE and masking are not counted.
        """
        D = self.ctx.d_model
        return 2 * 4 * D * D + 2 * 2 * min(seqlen, self.window) * D
