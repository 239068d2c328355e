"""Based linear attention in Triton: the autograd Function and the public `based_attn` (training and prefill)."""
from __future__ import annotations

from typing import Optional

import torch
from seqmix_kernels.backend import check_device

from seqmix_based.kernels.attn_bwd import based_bwd, denominator_grad
from seqmix_based.kernels.attn_fwd import based_fwd
from seqmix_based.kernels.attn_parallel import parallel_bwd, parallel_fwd
from seqmix_based.kernels.common import PARALLEL_MAX_T, KernelConfig, default_config
from seqmix_based.kernels.support import unsupported_sizes

BasedState = tuple[torch.Tensor, torch.Tensor]  # (kv_BHVE fp32, k_BHE fp32)


class BasedAttnFunction(torch.autograd.Function):
    """(q, k, v, kv0, z0) -> o, or (o, kvT, zT) with output_final_state; kv0/z0 may be None (zero state).

    configs: None (the defaults) or {phase: KernelConfig} overrides, see common.default_config.
    form: "parallel" (quadratic; no states), "chunked", or None: parallel when there is no state in or out and
    T <= common.PARALLEL_MAX_T, else chunked."""

    @staticmethod
    def forward(ctx, q_BTHF, k_BTHF, v_BTHV, kv0_BHVE, z0_BHE, output_final_state: bool, eps: float,
                configs: Optional[dict[str, KernelConfig]], form: Optional[str] = None):
        ctx.set_materialize_grads(False)  # an unused final state gets no zero gradient to scan
        stateless = kv0_BHVE is None and not output_final_state
        if form is None:
            form = "parallel" if stateless and q_BTHF.shape[1] <= PARALLEL_MAX_T else "chunked"
        if form == "parallel" and not stateless:
            raise ValueError("the parallel (quadratic) form carries no state; use form='chunked'")
        store_r = any(ctx.needs_input_grad[:5])
        if form == "parallel":
            cfg = _config(configs, q_BTHF, v_BTHV, "pfwd")
            o_BTHV, r_BHT = parallel_fwd(q_BTHF, k_BTHF, v_BTHV, store_r=store_r, eps=eps, config=cfg)
            final = None
        else:
            init = None if kv0_BHVE is None else (kv0_BHVE, z0_BHE)
            o_BTHV, r_BHT, final = based_fwd(q_BTHF, k_BTHF, v_BTHV, init, output_final_state=output_final_state,
                                             store_r=store_r, eps=eps, configs=configs)
        ctx.save_for_backward(q_BTHF, k_BTHF, v_BTHV, o_BTHV, r_BHT, kv0_BHVE, z0_BHE)
        ctx.configs, ctx.form = configs, form
        if output_final_state:
            return o_BTHV, final[0], final[1]
        return o_BTHV

    @staticmethod
    def backward(ctx, do_BTHV, dkvT_BHVE=None, dzT_BHE=None):
        q_BTHF, k_BTHF, v_BTHV, o_BTHV, r_BHT, kv0_BHVE, z0_BHE = ctx.saved_tensors
        B, T, H, F = q_BTHF.shape
        V, E = v_BTHV.shape[-1], 1 + F + F * F
        dev = q_BTHF.device
        do_BTHV = torch.zeros_like(o_BTHV) if do_BTHV is None else do_BTHV.contiguous()
        if ctx.form == "parallel":
            c_BHT = denominator_grad(do_BTHV, o_BTHV, r_BHT)
            dq, dk, dv = parallel_bwd(do_BTHV, q_BTHF, k_BTHF, v_BTHV, r_BHT, c_BHT,
                                      dq_config=_config(ctx.configs, q_BTHF, v_BTHV, "pdq"),
                                      dkv_config=_config(ctx.configs, q_BTHF, v_BTHV, "pdkv"))
            return dq, dk, dv, None, None, None, None, None, None
        dfinal = None
        if dkvT_BHVE is not None or dzT_BHE is not None:  # the final state was used
            dfinal = (torch.zeros(B, H, V, E, device=dev) if dkvT_BHVE is None else dkvT_BHVE.float().contiguous(),
                      torch.zeros(B, H, E, device=dev) if dzT_BHE is None else dzT_BHE.float().contiguous())
        init = None if kv0_BHVE is None else (kv0_BHVE, z0_BHE)
        need_dinit = init is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        dq, dk, dv, dinit = based_bwd(do_BTHV, q_BTHF, k_BTHF, v_BTHV, o_BTHV, r_BHT, init, dfinal,
                                      need_dinit=need_dinit, configs=ctx.configs)
        dkv0, dz0 = dinit if dinit is not None else (None, None)
        return dq, dk, dv, dkv0, dz0, None, None, None, None


# The stateless path (training: no state in or out, default configs) as torch.library custom ops, opaque to
# torch.compile (no graph break); a carried or returned state takes the autograd Function above.
@torch.library.custom_op("seqmix_based::based_attn_fwd", mutates_args=())
def _fwd_op(q_BTHF: torch.Tensor, k_BTHF: torch.Tensor, v_BTHV: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_BTHV, r_BHT = 1 / (den + eps) fp32): the quadratic form up to PARALLEL_MAX_T tokens, else chunked."""
    if q_BTHF.shape[1] <= PARALLEL_MAX_T:
        o, r = parallel_fwd(q_BTHF, k_BTHF, v_BTHV, store_r=True, eps=eps,
                            config=_config(None, q_BTHF, v_BTHV, "pfwd"))
    else:
        o, r, _ = based_fwd(q_BTHF, k_BTHF, v_BTHV, None, output_final_state=False, store_r=True, eps=eps)
    return o, r


@_fwd_op.register_fake
def _(q_BTHF, k_BTHF, v_BTHV, eps):
    B, T, H, _ = q_BTHF.shape
    return v_BTHV.new_empty(v_BTHV.shape), q_BTHF.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("seqmix_based::based_attn_bwd", mutates_args=())
def _bwd_op(do_BTHV: torch.Tensor, q_BTHF: torch.Tensor, k_BTHF: torch.Tensor, v_BTHV: torch.Tensor,
            o_BTHV: torch.Tensor, r_BHT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    do_BTHV = do_BTHV.contiguous()
    if q_BTHF.shape[1] <= PARALLEL_MAX_T:
        c_BHT = denominator_grad(do_BTHV, o_BTHV, r_BHT)
        return parallel_bwd(do_BTHV, q_BTHF, k_BTHF, v_BTHV, r_BHT, c_BHT,
                            dq_config=_config(None, q_BTHF, v_BTHV, "pdq"),
                            dkv_config=_config(None, q_BTHF, v_BTHV, "pdkv"))
    dq, dk, dv, _ = based_bwd(do_BTHV, q_BTHF, k_BTHF, v_BTHV, o_BTHV, r_BHT, None, None, need_dinit=False)
    return dq, dk, dv


@_bwd_op.register_fake
def _(do_BTHV, q_BTHF, k_BTHF, v_BTHV, o_BTHV, r_BHT):
    return q_BTHF.new_empty(q_BTHF.shape), k_BTHF.new_empty(k_BTHF.shape), v_BTHV.new_empty(v_BTHV.shape)


def _setup(ctx, inputs, output):
    q, k, v, _eps = inputs
    o, r = output
    ctx.save_for_backward(q, k, v, o, r)


def _backward(ctx, do_BTHV, _dr):
    q, k, v, o, r = ctx.saved_tensors
    if do_BTHV is None:
        do_BTHV = torch.zeros_like(o)
    dq, dk, dv = _bwd_op(do_BTHV, q, k, v, o, r)
    return dq, dk, dv, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def _config(configs, q_BTHF, v_BTHV, phase: str) -> KernelConfig:
    return (configs or {}).get(phase) or default_config(q_BTHF.shape[-1], v_BTHV.shape[-1], q_BTHF.dtype, phase)


def based_attn(
    q_BTHF: torch.Tensor,
    k_BTHF: torch.Tensor,
    v_BTHV: torch.Tensor,
    *,
    initial_state: Optional[BasedState] = None,
    output_final_state: bool = False,
    eps: float = 1e-12,
) -> tuple[torch.Tensor, Optional[BasedState]]:
    """Causal Based linear attention, fused Triton kernels (the twin of `naive.based_linear_ref`).

    q_BTHF, k_BTHF: [B, T, H, F] (F = 8, 16 or 24; 16 is the fast path); v_BTHV: [B, T, H, V], V a multiple
    of 16 up to 128; fp32, fp16 or bf16, all three the same dtype. Accumulation is fp32.
        o_i = sum_{j<=i} phi(q_i).phi(k_j) v_j / (sum_{j<=i} phi(q_i).phi(k_j) + eps),  phi(q).phi(k) = 1 + s + s^2/2
    with s = q.k / sqrt(F). initial_state: (kv [B, H, V, E], k [B, H, E]) fp32, E = 1 + F + F^2, read only.
    Returns (o_BTHV in v's dtype, (kv, k) after the last token if output_final_state else None).
    Differentiable w.r.t. q, k, v, the initial state and through the final state. With no state in or out and
    T <= common.PARALLEL_MAX_T it runs the quadratic form (attn_parallel), else the chunked one (attn_fwd,
    attn_bwd). Needs a CUDA device (see `is_available`); under TRITON_INTERPRET=1 it also runs on CPU tensors,
    slowly, for tests.
    """
    _check(q_BTHF, k_BTHF, v_BTHV, initial_state)
    q, k, v = q_BTHF.contiguous(), k_BTHF.contiguous(), v_BTHV.contiguous()
    kv0 = z0 = None
    if initial_state is not None:
        kv0, z0 = (s.float().contiguous() for s in initial_state)
    if kv0 is None and not output_final_state:
        return _fwd_op(q, k, v, float(eps))[0], None
    out = BasedAttnFunction.apply(q, k, v, kv0, z0, output_final_state, float(eps), None, None)
    if output_final_state:
        return out[0], (out[1], out[2])
    return out, None


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Optional[BasedState]) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"based_attn wants q, k [B, T, H, F] and v [B, T, H, V]; got q {list(q.shape)}, "
                         f"k {list(k.shape)}, v {list(v.shape)}")
    F, V = q.shape[-1], v.shape[-1]
    why = unsupported_sizes(F, V)
    if why is not None:
        raise ValueError(f"based_attn: {why}. Use impl='linear' (the reference) for other sizes.")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"based_attn wants q, k, v of one dtype among fp32/fp16/bf16; got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if state is not None:
        B, _, H, _ = q.shape
        E = 1 + F + F * F
        if tuple(state[0].shape) != (B, H, V, E) or tuple(state[1].shape) != (B, H, E):
            raise ValueError(f"initial_state must be (kv [B, H, V, E]={[B, H, V, E]}, k [B, H, E]={[B, H, E]}); "
                             f"got {list(state[0].shape)} and {list(state[1].shape)}")
    check_device("based_attn", q, k, v)
