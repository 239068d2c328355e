"""`mamba`: the Mamba-1 selective state-space mixer, with the parameter names and init of the mamba-ssm package."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from seqmix.builtins.conv import SHORT_CONV_IMPLS
from seqmix.mixer import Arg, BlockContext, Impl, Mixer, State, triton_kernel
from seqmix_mamba.naive import selective_scan_chunked, selective_scan_ref, selective_state_step_ref


def _load_kernel():
    from seqmix_mamba.kernel import selective_scan, selective_state_update  # imports triton: only when chosen

    return selective_scan, selective_state_update


# The scan: the Triton kernel (`auto` on a CUDA layer), the chunked PyTorch form (`auto` elsewhere), the definition.
IMPLS = {"triton": Impl("kernel", triton_kernel, load=_load_kernel, fits=lambda m: None if m.d_state <= 64 else
                        f"the kernel keeps d_state values per channel in registers (<= 64); this layer has "
                        f"{m.d_state}"),
         "sequential": Impl("view"), "chunked": Impl("reference")}


class Mamba(Mixer):
    """x -> in_proj -> [x | z]; x -> causal depthwise conv + SiLU -> selective scan; y * silu(z) -> out_proj.

    Parameters (names and shapes of mamba-ssm's `Mamba`, so its checkpoints load by name), E = expand * d:
      in_proj.weight [2E, d], conv1d.weight [E, 1, d_conv], conv1d.bias [E], x_proj.weight [R + 2N, E]
      (rows: [dt | B | C]), dt_proj.weight [E, R], dt_proj.bias [E], A_log [E, N], D [E], out_proj.weight [d, E].
    Decode state: {"conv": [B, E, d_conv] in the activation dtype (the last d_conv pre-conv inputs),
                   "ssm": [B, E, N] in fp32 (the scan state; the scan always runs in fp32)}.
    impl=triton (`auto` on a CUDA device) runs the scan, and the decode step, as Triton kernels
    (`seqmix_mamba.kernel`); chunked and sequential are the PyTorch forms.
    """

    name = "mamba"
    impls = IMPLS
    extra_impls = {"conv_impl": SHORT_CONV_IMPLS}
    description = "Mamba-1 selective state-space model (selective scan, short conv, SiLU gate)"
    spec_args = (
        Arg("d_state", int, 16, min=1, help="SSM state size N per channel"),
        Arg("expand", int, 2, min=1, help="inner width E = expand * d_model"),
        Arg("d_conv", int, 4, min=2, max=8, positional=False, help="taps of the causal depthwise conv"),
        Arg("dt_rank", int, None, min=1, positional=False, help="rank of the dt projection; default ceil(d/16)"),
        Arg("impl", str, "auto", choices=("auto", *IMPLS), positional=False,
            help="scan: triton (the kernel), sequential (the definition) or chunked (masked matrix form); "
                 "auto = triton for a layer on a CUDA device, else chunked"),
        Arg("chunk_size", int, 64, min=1, positional=False, help="chunk length of impl=chunked"),
        Arg("conv_impl", str, "auto", choices=("auto", *SHORT_CONV_IMPLS), positional=False,
            help="short conv path: triton = fused conv+bias+SiLU kernel; auto = triton for a layer on a CUDA device"),
    )
    state_kind = "recurrent"

    def __init__(self, ctx: BlockContext, d_state=16, expand=2, d_conv=4, dt_rank=None, impl="auto",
                 chunk_size=64, conv_impl="auto"):
        super().__init__(ctx)
        D = ctx.d_model
        self.d_inner = E = expand * D
        self.d_state = N = d_state
        self.d_conv = d_conv
        self.dt_rank = R = math.ceil(D / 16) if dt_rank is None else dt_rank
        self.chunk_size = chunk_size

        self.in_proj = nn.Linear(D, 2 * E, bias=False)  # D -> [x | z]
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, bias=True, padding=d_conv - 1)  # weights only; see forward
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)  # E -> [dt_low | B | C]
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))  # [E, N]
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, D, bias=False)
        self.A_log._no_weight_decay = True  # mamba-ssm's markers, read by optimizer-group builders
        self.D._no_weight_decay = True
        self._init_dt_proj()
        nn.init.normal_(self.out_proj.weight, std=ctx.out_init_std)
        # in_proj, x_proj and conv1d keep PyTorch's default init, as in mamba-ssm.

    @torch.no_grad()
    def _init_dt_proj(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
        """mamba-ssm's dt init: weight U(+-R^-0.5); bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]."""
        bound = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        log_dt = torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=dt_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.dt_proj.bias._no_reinit = True

    # -- shared pieces of forward and step ----------------------------------------------------------
    def _conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight[:, 0]  # [E, d_conv]; [:, -1] multiplies the current token

    def _ssm_inputs(self, u_XE: torch.Tensor):
        """u [..., E] -> (dt [..., E] fp32 after softplus, B [..., N], C [..., N], A [E, N] fp32)."""
        dt_low_XR, B_XN, C_XN = self.x_proj(u_XE).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt bias added in fp32 (as mamba-ssm's delta_bias), so a bf16 matmul does not round the bias away.
        dt_XE = F.softplus(F.linear(dt_low_XR, self.dt_proj.weight).float() + self.dt_proj.bias.float())
        A_EN = -torch.exp(self.A_log.float())
        return dt_XE, B_XN, C_XN, A_EN

    def _kernel_scan(self, u_BTE, z_BTE, h0_BEN):
        """The Triton path: softplus(delta + bias), the gate and the state kept in fp32 inside the kernel, which
        saves only its inputs and chunk-start states for the backward (no recomputation of the region needed)."""
        dt_low_BTR, B_BTN, C_BTN = self.x_proj(u_BTE).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta_BTE = F.linear(dt_low_BTR, self.dt_proj.weight)
        scan, _ = self.ops["impl"]
        return scan(u_BTE, delta_BTE, -torch.exp(self.A_log.float()), B_BTN, C_BTN, self.D.float(), z_BTE,
                    self.dt_proj.bias.float(), initial_state_BEN=h0_BEN)

    def _gated_scan(self, u_BTE, z_BTE, h0_BEN):
        """(y * silu(z) [B, T, E] fp32, final scan state [B, E, N]) for the conv output u and the gate z."""
        dt_BTE, B_BTN, C_BTN, A_EN = self._ssm_inputs(u_BTE)
        if self.impl == "chunked":
            y_BTE, ssm_BEN = selective_scan_chunked(u_BTE.float(), dt_BTE, A_EN, B_BTN, C_BTN, self.D,
                                                    initial_state_BEN=h0_BEN, chunk_size=self.chunk_size)
        else:
            y_BTE, ssm_BEN = selective_scan_ref(u_BTE.float(), dt_BTE, A_EN, B_BTN, C_BTN, self.D,
                                                initial_state_BEN=h0_BEN)
        return y_BTE * F.silu(z_BTE.float()), ssm_BEN

    # -- the contract ---------------------------------------------------------------------------------
    def forward(self, x_BTD: torch.Tensor, *, state: State = None, return_state: bool = False):
        x_BTE, z_BTE = self.in_proj(x_BTD).chunk(2, dim=-1)
        conv_BEK = None if state is None else state["conv"]
        conv, _ = self.ops["conv_impl"]
        u_BTE, new_conv_BEK = conv(x_BTE, self._conv_weight(), self.conv1d.bias, state_BCK=conv_BEK,
                                         activation="silu")
        h0_BEN = None if state is None else state["ssm"]
        if self.ops["impl"] is not None:
            g_BTE, ssm_BEN = self._kernel_scan(u_BTE, z_BTE, h0_BEN)
        elif torch.is_grad_enabled() and (u_BTE.requires_grad or self.A_log.requires_grad):
            # Training: recompute the scan's fp32 [B, T, E] intermediates in the backward instead of keeping
            # ~10 of them per layer (mamba-360m at 8 x 2048 tokens ran out of memory on an H200 without this).
            g_BTE, ssm_BEN = checkpoint(self._gated_scan, u_BTE, z_BTE, h0_BEN, use_reentrant=False)
        else:
            g_BTE, ssm_BEN = self._gated_scan(u_BTE, z_BTE, h0_BEN)
        out_BTD = self.out_proj(g_BTE.to(x_BTD.dtype))
        if not return_state:
            return out_BTD
        if state is not None:
            state["conv"].copy_(new_conv_BEK)
            state["ssm"].copy_(ssm_BEN)
            return out_BTD, state
        return out_BTD, {"conv": new_conv_BEK, "ssm": ssm_BEN}

    def init_state(self, batch_size: int, *, max_seqlen: int, device=None, dtype: torch.dtype = torch.float32):
        """Zeros; the conv state in `dtype` (the activation dtype), the scan state in fp32. Size ignores max_seqlen."""
        device = self.A_log.device if device is None else device
        return {"conv": torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=dtype),
                "ssm": torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32)}

    def step(self, x_BD: torch.Tensor, state: State):
        """One token; updates state["conv"] and state["ssm"] in place."""
        x_BE, z_BE = self.in_proj(x_BD).chunk(2, dim=-1)
        _, conv_step = self.ops["conv_impl"]
        u_BE = conv_step(x_BE, state["conv"], self._conv_weight(), self.conv1d.bias, activation="silu")
        if self.ops["impl"] is not None:  # the fused decode kernel: softplus, scan step, D skip and gate
            dt_low_BR, B_BN, C_BN = self.x_proj(u_BE).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
            _, update = self.ops["impl"]
            y_BE = update(state["ssm"], u_BE, F.linear(dt_low_BR, self.dt_proj.weight), -torch.exp(self.A_log.float()),
                          B_BN, C_BN, self.D.float(), z_BE, self.dt_proj.bias.float())
            return self.out_proj(y_BE.to(x_BD.dtype)), state
        dt_BE, B_BN, C_BN, A_EN = self._ssm_inputs(u_BE)
        y_BE = selective_state_step_ref(state["ssm"], u_BE.float(), dt_BE, A_EN, B_BN, C_BN, self.D)
        return self.out_proj((y_BE * F.silu(z_BE.float())).to(x_BD.dtype)), state

    def state_bytes(self, batch_size: int, seqlen: int, dtype: torch.dtype = torch.float32) -> int:
        """conv: B * E * d_conv in `dtype`; ssm: B * E * N in fp32. Independent of seqlen."""
        conv = batch_size * self.d_inner * self.d_conv * torch.empty((), dtype=dtype).element_size()
        return conv + batch_size * self.d_inner * self.d_state * 4

    def flops_per_token(self, seqlen: int) -> int:
        """Forward FLOPs per token (2 per multiply-add), the same at every seqlen (a recurrence).

        Counted: the four matmuls (in_proj 2E*d, x_proj (R+2N)*E, dt_proj E*R, out_proj d*E), the conv
        (d_conv taps per channel), the scan's three multiply-adds per state element (decay * h,
        + B * (dt * u), C * h) and the per-channel dt * u, D * u and gate products. Not counted: exp,
        softplus, SiLU, bias adds. This is the recurrence's cost; impl=chunked does O(chunk_size) more.
        """
        D, E, N, R = self.ctx.d_model, self.d_inner, self.d_state, self.dt_rank
        matmuls = D * 2 * E + E * (R + 2 * N) + R * E + E * D
        return 2 * (matmuls + E * self.d_conv + 3 * E * N) + 3 * E
