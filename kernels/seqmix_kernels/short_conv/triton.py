"""Causal depthwise short convolution with SiLU and the output gate fused, on Triton: forward, backward, decode step.

    y_t = gate_t * act(sum_j w[c, j] x_{t-K+1+j} + bias_c),   positions < 0 read the carried state (or zeros)

Forward: one program per [BT, BC] tile of (time, channels); the K shifted input tiles are read from global
memory (the overlap hits L1/L2), so HBM traffic is one read of x and the gate and one write of y.
Backward: one program per channel block and run of time tiles. It recomputes the pre-activation instead of
storing it, writes dx (and d gate, d state) once, and keeps dw / dbias partial sums in registers; the partials
(one row per program, fp32) are summed by the launcher, so the result is deterministic.
The twin is `seqmix_kernels.short_conv.naive.short_conv_ref` / `short_conv_step_ref` (same signatures).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from seqmix_kernels.backend import check_device


@triton.jit
def _preact(x_ptr, s_ptr, w_ptr, b_ptr, i_b, rows, cols, T, C, sxb, sxt,
            K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """The convolution plus bias at positions `rows`, fp32 [BT, BC]; inputs at positions < 0 come from the
    state (slot K + p of [B, C, K]) or are zero."""
    cm = cols < C
    x_base = x_ptr + i_b.to(tl.int64) * sxb + cols[None, :]
    s_base = s_ptr + (i_b.to(tl.int64) * C + cols[None, :]) * K
    acc = tl.zeros([BT, BC], tl.float32)
    for j in tl.static_range(K):
        p = rows - (K - 1) + j
        x = tl.load(x_base + p.to(tl.int64)[:, None] * sxt, mask=((p >= 0) & (p < T))[:, None] & cm[None, :],
                    other=0.0).to(tl.float32)
        if HAS_STATE:
            x += tl.load(s_base + (p[:, None] + K), mask=((p < 0) & (p > -K))[:, None] & cm[None, :],
                         other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols * K + j, mask=cm, other=0.0).to(tl.float32)
        acc += x * w[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _short_conv_fwd_kernel(
    x_ptr, g_ptr, w_ptr, b_ptr, s_ptr, y_ptr,
    T, C, sxb, sxt, sgb, sgt,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_GATE: tl.constexpr,
    SILU: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = i_t * BT + tl.arange(0, BT)
    cols = i_c * BC + tl.arange(0, BC)
    acc = _preact(x_ptr, s_ptr, w_ptr, b_ptr, i_b, rows, cols, T, C, sxb, sxt, K, HAS_BIAS, HAS_STATE, BT, BC)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    m = (rows < T)[:, None] & (cols < C)[None, :]
    r64 = rows.to(tl.int64)
    if HAS_GATE:
        acc *= tl.load(g_ptr + i_b.to(tl.int64) * sgb + r64[:, None] * sgt + cols[None, :],
                       mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + (i_b.to(tl.int64) * T + r64)[:, None] * C + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m)


@triton.jit
def _short_conv_bwd_kernel(
    x_ptr, g_ptr, w_ptr, b_ptr, s_ptr, dy_ptr, dx_ptr, dg_ptr, ds_ptr, dw_ptr, db_ptr,
    T, C, sxb, sxt, sgb, sgt, rows_per_prog, n_chunks,
    K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_GATE: tl.constexpr,
    STORE_DSTATE: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    # Rows q in [0, T + K - 1): a tile Q owns da at rows Q (dw, dbias, d gate) and writes dx at rows Q - (K-1),
    # which needs da at rows Q - (K-1) .. Q; dx rows < 0 are the gradient of the carried state.
    i_c, i_p = tl.program_id(0), tl.program_id(1)
    i_b = i_p // n_chunks
    i_k = i_p % n_chunks
    cols = i_c * BC + tl.arange(0, BC)
    cm = cols < C
    kk = tl.arange(0, KP)
    dw_acc = tl.zeros([BC, KP], tl.float32)
    db_acc = tl.zeros([BC], tl.float32)
    q_lo = i_k * rows_per_prog
    q_hi = tl.minimum(q_lo + rows_per_prog, T + K - 1)
    for q0 in range(q_lo, q_hi, BT):
        Q = q0 + tl.arange(0, BT)
        dx = tl.zeros([BT, BC], tl.float32)
        for m in tl.static_range(K):
            r = Q - (K - 1) + m
            r64 = r.to(tl.int64)
            rm = ((r >= 0) & (r < T))[:, None] & cm[None, :]
            a = _preact(x_ptr, s_ptr, w_ptr, b_ptr, i_b, r, cols, T, C, sxb, sxt, K, HAS_BIAS, HAS_STATE, BT, BC)
            dy = tl.load(dy_ptr + (i_b.to(tl.int64) * T + r64)[:, None] * C + cols[None, :], mask=rm,
                         other=0.0).to(tl.float32)
            dact = dy
            if HAS_GATE:
                dact = dy * tl.load(g_ptr + i_b.to(tl.int64) * sgb + r64[:, None] * sgt + cols[None, :], mask=rm,
                                    other=0.0).to(tl.float32)
            act = a
            da = dact
            if SILU:
                sig = tl.sigmoid(a)
                act = a * sig
                da = dact * (sig * (1.0 + a * (1.0 - sig)))
            w = tl.load(w_ptr + cols * K + (K - 1 - m), mask=cm, other=0.0).to(tl.float32)
            dx += da * w[None, :]
            if m == K - 1:  # r == Q: the rows this tile owns
                if HAS_GATE:
                    tl.store(dg_ptr + (i_b.to(tl.int64) * T + r64)[:, None] * C + cols[None, :],
                             (dy * act).to(dg_ptr.dtype.element_ty), mask=rm)
                db_acc += tl.sum(da, 0)
                for j in tl.static_range(K):  # dw_j += sum_t da_t x_{t-K+1+j}
                    p = Q - (K - 1) + j
                    xj = tl.load(x_ptr + i_b.to(tl.int64) * sxb + p.to(tl.int64)[:, None] * sxt + cols[None, :],
                                 mask=((p >= 0) & (p < T))[:, None] & cm[None, :], other=0.0).to(tl.float32)
                    if HAS_STATE:
                        xj += tl.load(s_ptr + (i_b.to(tl.int64) * C + cols[None, :]) * K + (p[:, None] + K),
                                      mask=((p < 0) & (p > -K))[:, None] & cm[None, :], other=0.0).to(tl.float32)
                    dw_acc += tl.where(kk[None, :] == j, tl.sum(da * xj, 0)[:, None], 0.0)
        P = Q - (K - 1)
        p64 = P.to(tl.int64)
        tl.store(dx_ptr + (i_b.to(tl.int64) * T + p64)[:, None] * C + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=((P >= 0) & (P < T))[:, None] & cm[None, :])
        if STORE_DSTATE:
            tl.store(ds_ptr + (i_b.to(tl.int64) * C + cols[None, :]) * K + (P[:, None] + K), dx,
                     mask=((P < 0) & (P > -K))[:, None] & cm[None, :])
    tl.store(dw_ptr + (i_p.to(tl.int64) * C + cols[:, None]) * K + kk[None, :], dw_acc,
             mask=cm[:, None] & (kk < K)[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + i_p.to(tl.int64) * C + cols, db_acc, mask=cm)


@triton.jit
def _short_conv_step_kernel(
    x_ptr, g_ptr, w_ptr, b_ptr, s_ptr, y_ptr, C, sxb, sgb,
    K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, SILU: tl.constexpr,
    BC: tl.constexpr,
):
    i_c, i_b = tl.program_id(0), tl.program_id(1)
    cols = i_c * BC + tl.arange(0, BC)
    cm = cols < C
    kk = tl.arange(0, KP)
    sm = cm[:, None] & (kk < K)[None, :]
    s_base = s_ptr + (i_b.to(tl.int64) * C + cols[:, None]) * K
    old = tl.load(s_base + kk[None, :] + 1, mask=cm[:, None] & (kk < K - 1)[None, :], other=0.0)
    x = tl.load(x_ptr + i_b.to(tl.int64) * sxb + cols, mask=cm, other=0.0).to(s_ptr.dtype.element_ty)
    new = tl.where(kk[None, :] == K - 1, x[:, None], old)  # slot j <- slot j + 1, slot K-1 <- x
    tl.store(s_base + kk[None, :], new, mask=sm)
    w = tl.load(w_ptr + cols[:, None] * K + kk[None, :], mask=sm, other=0.0).to(tl.float32)
    acc = tl.sum(new.to(tl.float32) * w, 1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    if HAS_GATE:
        acc *= tl.load(g_ptr + i_b.to(tl.int64) * sgb + cols, mask=cm, other=0.0).to(tl.float32)
    tl.store(y_ptr + i_b.to(tl.int64) * C + cols, acc.to(y_ptr.dtype.element_ty), mask=cm)


# -- launchers ------------------------------------------------------------------------------------------------
def _blocks(x: torch.Tensor, phase: str) -> tuple[int, int, int]:
    """(BT, BC, num_warps). Under the interpreter (CPU) the cost is per program and op, not per element: few,
    large programs (small test shapes still span two time tiles)."""
    if x.device.type != "cuda":
        return 32, 128, 1
    return (32, 128, 4) if phase == "fwd" else (32, 64, 4)


def short_conv_fwd(x_BTC, weight_CK, bias_C, state_BCK, gate_BTC, silu: bool) -> torch.Tensor:
    """y_BTC (contiguous, x's dtype). x_BTC / gate_BTC: unit stride over channels; the rest contiguous."""
    B, T, C = x_BTC.shape
    K = weight_CK.shape[1]
    y = torch.empty(B, T, C, device=x_BTC.device, dtype=x_BTC.dtype)
    g = gate_BTC if gate_BTC is not None else x_BTC
    BT, BC, nw = _blocks(x_BTC, "fwd")
    grid = (triton.cdiv(T, BT), triton.cdiv(C, BC), B)
    _short_conv_fwd_kernel[grid](
        x_BTC, g, weight_CK, bias_C if bias_C is not None else weight_CK,
        state_BCK if state_BCK is not None else weight_CK, y,
        T, C, x_BTC.stride(0), x_BTC.stride(1), g.stride(0), g.stride(1),
        K=K, HAS_BIAS=bias_C is not None, HAS_STATE=state_BCK is not None, HAS_GATE=gate_BTC is not None,
        SILU=silu, BT=BT, BC=BC, num_warps=nw,
    )
    return y


def short_conv_bwd(dy_BTC, x_BTC, weight_CK, bias_C, state_BCK, gate_BTC, silu: bool, need_dstate: bool):
    """(dx_BTC, dweight_CK, dbias_C or None, dstate_BCK or None, dgate_BTC or None)."""
    B, T, C = x_BTC.shape
    K = weight_CK.shape[1]
    dev = x_BTC.device
    BT, BC, nw = _blocks(x_BTC, "bwd")
    n_cb = triton.cdiv(C, BC)
    n_tiles = triton.cdiv(T + K - 1, BT)
    target = 4 * torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 2
    chunks = max(1, min(n_tiles, triton.cdiv(target, B * n_cb)))
    rows_per_prog = triton.cdiv(n_tiles, chunks) * BT
    n_chunks = triton.cdiv(T + K - 1, rows_per_prog)
    dx = torch.empty(B, T, C, device=dev, dtype=x_BTC.dtype)
    dg = torch.empty(B, T, C, device=dev, dtype=gate_BTC.dtype) if gate_BTC is not None else None
    ds = torch.zeros(B, C, K, device=dev, dtype=torch.float32) if need_dstate else None
    dw_part = torch.empty(B * n_chunks, C, K, device=dev, dtype=torch.float32)
    db_part = torch.empty(B * n_chunks, C, device=dev, dtype=torch.float32) if bias_C is not None else None
    g = gate_BTC if gate_BTC is not None else x_BTC
    dummy = dw_part
    _short_conv_bwd_kernel[(n_cb, B * n_chunks)](
        x_BTC, g, weight_CK, bias_C if bias_C is not None else dummy, state_BCK if state_BCK is not None else dummy,
        dy_BTC, dx, dg if dg is not None else dummy, ds if ds is not None else dummy, dw_part,
        db_part if db_part is not None else dummy,
        T, C, x_BTC.stride(0), x_BTC.stride(1), g.stride(0), g.stride(1), rows_per_prog, n_chunks,
        K=K, KP=triton.next_power_of_2(K), HAS_BIAS=bias_C is not None, HAS_STATE=state_BCK is not None,
        HAS_GATE=gate_BTC is not None, STORE_DSTATE=need_dstate, SILU=silu, BT=BT, BC=BC, num_warps=nw,
    )
    dw = dw_part.sum(0).to(weight_CK.dtype)
    db = db_part.sum(0).to(bias_C.dtype) if bias_C is not None else None
    return dx, dw, db, (ds.to(state_BCK.dtype) if ds is not None else None), dg


# The autograd pair as torch.library custom ops (opaque to torch.compile: no graph break). Absent optional
# gradients come back as empty [0] tensors (a custom op returns tensors only).
@torch.library.custom_op("seqmix_kernels::short_conv_fwd", mutates_args=())
def _fwd_op(x_BTC: torch.Tensor, weight_CK: torch.Tensor, bias_C: Optional[torch.Tensor],
            state_BCK: Optional[torch.Tensor], gate_BTC: Optional[torch.Tensor], silu: bool) -> torch.Tensor:
    return short_conv_fwd(x_BTC, weight_CK, bias_C, state_BCK, gate_BTC, silu)


@_fwd_op.register_fake
def _(x_BTC, weight_CK, bias_C, state_BCK, gate_BTC, silu):
    return x_BTC.new_empty(x_BTC.shape)


@torch.library.custom_op("seqmix_kernels::short_conv_bwd", mutates_args=())
def _bwd_op(dy_BTC: torch.Tensor, x_BTC: torch.Tensor, weight_CK: torch.Tensor, bias_C: Optional[torch.Tensor],
            state_BCK: Optional[torch.Tensor], gate_BTC: Optional[torch.Tensor], silu: bool,
            need_dstate: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db, ds, dg = short_conv_bwd(dy_BTC.contiguous(), x_BTC, weight_CK, bias_C, state_BCK, gate_BTC, silu,
                                        need_dstate=need_dstate)
    def empty():
        return x_BTC.new_empty(0)  # a fresh one per output: outputs may not alias

    return dx, dw, (db if db is not None else empty()), (ds if ds is not None else empty()), \
        (dg if dg is not None else empty())


@_bwd_op.register_fake
def _(dy_BTC, x_BTC, weight_CK, bias_C, state_BCK, gate_BTC, silu, need_dstate):
    return (x_BTC.new_empty(x_BTC.shape), weight_CK.new_empty(weight_CK.shape),
            bias_C.new_empty(bias_C.shape) if bias_C is not None else x_BTC.new_empty(0),
            state_BCK.new_empty(state_BCK.shape) if state_BCK is not None and need_dstate else x_BTC.new_empty(0),
            gate_BTC.new_empty(gate_BTC.shape) if gate_BTC is not None else x_BTC.new_empty(0))


def _setup(ctx, inputs, output):
    x, w, b, s, g, silu = inputs
    ctx.save_for_backward(x, w, b, s, g)
    ctx.silu = silu
    ctx.has = (b is not None, s is not None, g is not None)


def _backward(ctx, dy_BTC):
    x, w, b, s, g = ctx.saved_tensors
    has_b, has_s, has_g = ctx.has
    need_ds = has_s and ctx.needs_input_grad[3]
    dx, dw, db, ds, dg = _bwd_op(dy_BTC, x, w, b if has_b else None, s if has_s else None, g if has_g else None,
                                 ctx.silu, need_ds)
    return dx, dw, (db if has_b else None), (ds if need_ds else None), (dg if has_g else None), None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def short_conv(
    x_BTC: torch.Tensor,
    weight_CK: torch.Tensor,
    bias_C: Optional[torch.Tensor] = None,
    *,
    state_BCK: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    gate_BTC: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv over time, fused with bias, SiLU and the gate; returns (y_BTC, new_state_BCK).

    x_BTC: [B, T, C] (channels at unit stride; e.g. a half of a `chunk(2, -1)` is fine), fp32/fp16/bf16.
    weight_CK: [C, K], weight_CK[:, -1] multiplies the current token. bias_C: [C] or None.
    state_BCK: [B, C, K] the last K inputs of the previous chunk (slot K-1 the latest), or None for zeros.
    activation: None or "silu". gate_BTC: [B, T, C] like x, multiplies the activated output, or None.
    Accumulates in fp32; y has x's dtype. new_state_BCK (state's dtype, x's if None) holds the last K inputs.
    Differentiable w.r.t. x, weight, bias, state and gate.
    """
    _check(x_BTC, weight_CK, bias_C, state_BCK, gate_BTC, activation)
    x = x_BTC if x_BTC.stride(-1) == 1 else x_BTC.contiguous()
    g = None if gate_BTC is None else (gate_BTC if gate_BTC.stride(-1) == 1 else gate_BTC.contiguous())
    s = None if state_BCK is None else state_BCK.contiguous()
    y = _fwd_op(x, weight_CK.contiguous(), bias_C, s, g, activation == "silu")
    K = weight_CK.shape[1]
    prev = x.new_zeros(x.shape[0], x.shape[2], K) if state_BCK is None else state_BCK
    tail_BCK = x[:, -K:].transpose(1, 2).to(prev.dtype)
    new_BCK = tail_BCK if x.shape[1] >= K else torch.cat([prev, tail_BCK], -1)[:, :, -K:]
    return y, new_BCK.contiguous()


def short_conv_step(
    x_BC: torch.Tensor,
    state_BCK: torch.Tensor,
    weight_CK: torch.Tensor,
    bias_C: Optional[torch.Tensor] = None,
    *,
    activation: Optional[str] = None,
    gate_BC: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One decode token: shifts x_BC [B, C] into state_BCK [B, C, K] IN PLACE, returns y_BC (x's dtype).

    Inference only (no autograd); one launch, no allocation besides y, so it can be captured in a CUDA graph.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x_BC, weight_CK, bias_C, gate_BC)):
        raise RuntimeError("short_conv_step is inference-only; run it under torch.no_grad() (train with short_conv)")
    B, C = x_BC.shape
    K = weight_CK.shape[1]
    if tuple(state_BCK.shape) != (B, C, K) or not state_BCK.is_contiguous():
        raise ValueError(f"state_BCK must be a contiguous [B, C, K] = {[B, C, K]} tensor, got "
                         f"{list(state_BCK.shape)} (contiguous={state_BCK.is_contiguous()})")
    _check(x_BC[:, None], weight_CK, bias_C, None, None if gate_BC is None else gate_BC[:, None], activation)
    check_device("short_conv_step", state_BCK)
    x = x_BC if x_BC.stride(-1) == 1 else x_BC.contiguous()
    g = None if gate_BC is None else (gate_BC if gate_BC.stride(-1) == 1 else gate_BC.contiguous())
    w = weight_CK.contiguous()
    y = torch.empty(B, C, device=x.device, dtype=x.dtype)
    BC = 128 if x.device.type != "cuda" else 256
    _short_conv_step_kernel[(triton.cdiv(C, BC), B)](
        x, g if g is not None else x, w, bias_C if bias_C is not None else w, state_BCK, y,
        C, x.stride(0), (g if g is not None else x).stride(0),
        K=K, KP=triton.next_power_of_2(K), HAS_BIAS=bias_C is not None, HAS_GATE=g is not None,
        SILU=activation == "silu", BC=BC, num_warps=1 if x.device.type != "cuda" else 2,
    )
    return y


def _check(x, weight, bias, state, gate, activation) -> None:
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(f"short_conv wants x [B, T, C] and weight [C, K]; got x {list(x.shape)}, "
                         f"weight {list(weight.shape)}")
    B, T, C = x.shape
    K = weight.shape[1]
    if not 1 <= K <= 8:
        raise ValueError(f"short_conv supports kernel sizes 1..8, got K={K}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"bias must be [C] = [{C}], got {list(bias.shape)}")
    if state is not None and tuple(state.shape) != (B, C, K):
        raise ValueError(f"state_BCK must be [B, C, K] = {[B, C, K]}, got {list(state.shape)}")
    if gate is not None and (gate.shape != x.shape or gate.dtype != x.dtype):
        raise ValueError(f"gate must match x ({list(x.shape)}, {x.dtype}); got {list(gate.shape)}, {gate.dtype}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"short_conv supports fp32, fp16 and bf16 inputs, got {x.dtype}")
    check_device("short_conv", x, weight, bias, state, gate)
