"""`based`: Based linear attention (Taylor feature map), with its quadratic, chunked and recurrent views."""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import nn

from seqmix.mixer import Arg, BlockContext, Impl, Mixer, State, resolve_heads
from seqmix_based.kernels import is_available, unsupported_sizes
from seqmix_based.naive import (
    BasedState,
    based_linear_ref,
    based_quadratic_ref,
    based_recurrent_ref,
    based_step_ref,
    expanded_dim,
    taylor_feature_map,
)

# A view maps (q_BTHF, k_BTHF, v_BTHV, initial_state, output_final_state, chunk_size, eps) to
# (o_BTHV, final state or None); the initial state is read, never written.
View = Callable[..., tuple[torch.Tensor, Optional[BasedState]]]


def _quadratic_view(q_BTHF, k_BTHF, v_BTHV, *, initial_state, output_final_state, chunk_size, eps):
    """The T x T form. A carried state adds kv . phi(q) and k . phi(q) to numerator and denominator, which is
    exactly one chunk of the chunked form spanning the whole call; that is what runs when a state is given."""
    if initial_state is not None:
        return based_linear_ref(q_BTHF, k_BTHF, v_BTHV, initial_state=initial_state,
                                output_final_state=output_final_state, chunk_size=max(q_BTHF.shape[1], 1), eps=eps)
    o_BTHV = based_quadratic_ref(q_BTHF, k_BTHF, v_BTHV, eps=eps)
    if not output_final_state:
        return o_BTHV, None
    fk_BTHE = taylor_feature_map(k_BTHF)
    return o_BTHV, (torch.einsum("bthv,bthe->bhve", v_BTHV.float(), fk_BTHE), fk_BTHE.sum(1))


def _linear_view(q_BTHF, k_BTHF, v_BTHV, *, initial_state, output_final_state, chunk_size, eps):
    return based_linear_ref(q_BTHF, k_BTHF, v_BTHV, initial_state=initial_state,
                            output_final_state=output_final_state, chunk_size=chunk_size, eps=eps)


def _recurrent_view(q_BTHF, k_BTHF, v_BTHV, *, initial_state, output_final_state, chunk_size, eps):
    return based_recurrent_ref(q_BTHF, k_BTHF, v_BTHV, initial_state=initial_state,
                               output_final_state=output_final_state, eps=eps)


def _kernel_view(kernel, q_BTHF, k_BTHF, v_BTHV, *, initial_state, output_final_state, chunk_size, eps):
    """The Triton kernel (seqmix_based.kernels): feature map fused, the E-wide features never reach HBM."""
    return kernel(q_BTHF, k_BTHF, v_BTHV, initial_state=initial_state, output_final_state=output_final_state,
                  eps=eps)


def _kernel_ops():
    from seqmix_based.kernels import based_attn, based_step  # imports triton: only when the kernel is chosen

    return functools.partial(_kernel_view, based_attn), based_step  # the step updates the state in place


# impl -> (view, decode step); `auto` takes the kernel for a layer on a CUDA device it fits, else linear.
IMPLS = {
    "quadratic": Impl("view", load=lambda: (_quadratic_view, based_step_ref)),
    "linear": Impl("reference", load=lambda: (_linear_view, based_step_ref)),
    "recurrent": Impl("view", load=lambda: (_recurrent_view, based_step_ref)),
    "parallel": Impl("kernel", is_available, load=_kernel_ops,  # the kernels: F <= 32, V in 16..128 (% 16)
                     fits=lambda m: unsupported_sizes(m.feature_dim, m.head_dim)),
}


class BasedLinearAttention(Mixer):
    """Based linear attention: y_i = sum_{j<=i} phi(q_i).phi(k_j) v_j / (sum_{j<=i} phi(q_i).phi(k_j) + eps).

    phi is the 2nd-order Taylor map (phi(q).phi(k) = 1 + s + s^2/2, s = q.k/sqrt(F)), E = 1 + F + F^2 features.
    Parameters match the Based checkpoint: `proj_q`, `proj_k` (d -> H*F), `proj_v` (d -> d, head dim V = d/H),
    `out_proj` (d -> d), no biases. No rotary, no normalisation beyond the feature map.
    Decode state, fp32 whatever the model dtype, constant in the sequence length:
        {"kv": [B, H, V, E] = sum_t v_t (x) phi(k_t),  "k": [B, H, E] = sum_t phi(k_t)}
    `impl` picks the training/prefill view (and the decode step) once per device; every view accepts and returns
    a carried state.
    """

    name = "based"
    impls = IMPLS
    description = "Based linear attention (2nd-order Taylor feature map); constant-size recurrent state"
    spec_args = (
        Arg("impl", str, "auto", choices=("auto", *IMPLS),
            help="auto = the kernel for a layer on a CUDA device it fits, else linear; quadratic = O(T^2) scores; "
                 "linear = chunked O(T); recurrent = token by token; parallel = Triton kernel"),
        Arg("feature_dim", int, 16, min=1, max=64, help="q/k feature dim per head (F); expanded to 1 + F + F^2"),
        Arg("heads", int, None, min=1, help="heads; default the model's n_heads"),
        Arg("chunk_size", int, 64, min=1, positional=False, help="tokens per chunk of the linear view"),
        Arg("eps", float, 1e-12, min=0.0, positional=False, help="added to the denominator"),
    )
    state_kind = "recurrent"

    def __init__(self, ctx: BlockContext, impl: str = "auto", feature_dim: int = 16,
                 heads: Optional[int] = None, chunk_size: int = 64, eps: float = 1e-12):
        super().__init__(ctx)
        D = ctx.d_model
        self.n_heads = resolve_heads(ctx, heads, D)
        self.feature_dim = feature_dim
        self.head_dim = D // self.n_heads
        self.chunk_size = chunk_size
        self.eps = eps
        HF = self.n_heads * feature_dim
        self.proj_q = nn.Linear(D, HF, bias=False)  # D -> H*F
        self.proj_k = nn.Linear(D, HF, bias=False)  # D -> H*F
        self.proj_v = nn.Linear(D, D, bias=False)  # D -> H*V
        self.out_proj = nn.Linear(D, D, bias=False)
        for lin in (self.proj_q, self.proj_k, self.proj_v):
            nn.init.normal_(lin.weight, std=ctx.init_std)
        nn.init.normal_(self.out_proj.weight, std=ctx.out_init_std)

    # -- projections ------------------------------------------------------------------------------
    def _qkv(self, x_BTD: torch.Tensor):
        """q, k [B, T, H, F] and v [B, T, H, V] (T may be absent: [B, D] -> [B, H, F] / [B, H, V])."""
        lead = x_BTD.shape[:-1]
        H = self.n_heads
        q = self.proj_q(x_BTD).view(*lead, H, self.feature_dim)
        k = self.proj_k(x_BTD).view(*lead, H, self.feature_dim)
        v = self.proj_v(x_BTD).view(*lead, H, self.head_dim)
        return q, k, v

    # -- the contract -----------------------------------------------------------------------------
    def forward(self, x_BTD: torch.Tensor, *, state: State = None, return_state: bool = False):
        """y_BTD; with return_state, also the state after the last token (written into `state` if given)."""
        B, T, D = x_BTD.shape
        q_BTHF, k_BTHF, v_BTHV = self._qkv(x_BTD)
        init = None if state is None else (state["kv"], state["k"])
        view, _ = self.ops["impl"]
        o_BTHV, final = view(q_BTHF, k_BTHF, v_BTHV, initial_state=init, output_final_state=return_state,
                             chunk_size=self.chunk_size, eps=self.eps)
        y_BTD = self.out_proj(o_BTHV.reshape(B, T, D))
        if not return_state:
            return y_BTD
        if state is None:
            return y_BTD, {"kv": final[0], "k": final[1]}
        state["kv"].copy_(final[0])  # in place: the caller's buffers (CUDA graphs) stay valid
        state["k"].copy_(final[1])
        return y_BTD, state

    def init_state(self, batch_size, *, max_seqlen, device=None, dtype=torch.float32):
        """Zeros, always fp32 (`dtype` is ignored: sums over long sequences need it); on the weights' device
        unless `device` is given. The size does not depend on `max_seqlen`."""
        device = self.proj_q.weight.device if device is None else device
        E = expanded_dim(self.feature_dim)
        return {
            "kv": torch.zeros(batch_size, self.n_heads, self.head_dim, E, device=device, dtype=torch.float32),
            "k": torch.zeros(batch_size, self.n_heads, E, device=device, dtype=torch.float32),
        }

    def step(self, x_BD: torch.Tensor, state: State):
        """One token per sequence; updates `state` in place (a fresh one is made if it is None)."""
        B, D = x_BD.shape
        if state is None:
            state = self.init_state(B, max_seqlen=1, device=x_BD.device)
        q_BHF, k_BHF, v_BHV = self._qkv(x_BD)
        _, step = self.ops["impl"]
        o_BHV = step(q_BHF, k_BHF, v_BHV, (state["kv"], state["k"]), eps=self.eps)
        return self.out_proj(o_BHV.reshape(B, D)), state

    def flops_per_token(self, seqlen: int) -> int:
        """2 per multiply-add, the recurrent form (what inference runs), independent of `seqlen`:
        projections 2*d*(2*H*F + 2*d); numerator update v (x) phi(k) and read kv . phi(q), 2*2*H*V*E;
        denominator update and read, 2*2*H*E. The feature map (~2*H*F^2) and the division are not counted.
        The quadratic view costs O(T) per token instead; this reports the form a model decodes with."""
        D, H, F, V = self.ctx.d_model, self.n_heads, self.feature_dim, self.head_dim
        E = expanded_dim(F)
        return 2 * D * (2 * H * F + 2 * D) + 2 * 2 * H * V * E + 2 * 2 * H * E
