"""`conv`: BaseConv, the gated short convolution of Based (in_proj -> causal depthwise conv, SiLU, * gate)."""
import logging
from typing import Mapping, Optional, Union

import torch
from torch import nn

from seqmix.mixer import Arg, BlockContext, Mixer
from seqmix_kernels.backend import IMPLS, available_impls, impl_for, resolve_impl
from seqmix_kernels.short_conv import short_conv_fns

logger = logging.getLogger(__name__)


class BaseConv(Mixer):
    name = "conv"
    description = "gated short convolution (BaseConv): conv branch, SiLU, times a linear gate"
    spec_args = (
        Arg("kernel_size", int, 3, min=2, max=8, help="taps of the causal depthwise conv"),
        Arg("expand", int, 2, min=1, positional=False, help="inner width = expand * d_model"),
        Arg("impl", str, "auto", choices=("auto",) + IMPLS, positional=False,
            help="conv path: triton = fused conv+SiLU+gate kernel; auto = triton on a CUDA machine, else reference"),
    )
    state_kind = "window"

    def __init__(self, ctx: BlockContext, kernel_size=3, expand=2, impl="auto"):
        super().__init__(ctx)
        self.args = {"kernel_size": kernel_size, "expand": expand, "impl": impl}
        for arg in self.spec_args:  # direct construction gets the same checks as spec text
            arg.convert(self.args[arg.name])
        self.impl = resolve_impl(impl, "conv")
        self._fns = {i: short_conv_fns(i) for i in {self.impl, "reference"}}  # (conv, step); one signature
        logger.debug("conv layer %d: impl=%s (asked %s)", ctx.layer_idx, self.impl, impl)
        D = ctx.d_model
        self.inner = expand * D
        self.kernel_size = kernel_size
        self.in_proj = nn.Linear(D, 2 * self.inner)  # [conv branch | gate]
        self.conv_weight = nn.Parameter(torch.empty(self.inner, kernel_size))  # [C, K]; [:, -1] = current token
        self.out_proj = nn.Linear(self.inner, D)
        nn.init.normal_(self.in_proj.weight, std=ctx.init_std)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.normal_(self.out_proj.weight, std=ctx.out_init_std)
        nn.init.zeros_(self.out_proj.bias)
        nn.init.kaiming_uniform_(self.conv_weight.view(self.inner, 1, kernel_size), a=5**0.5)  # nn.Conv1d's

    def forward(self, x_BTD, *, state=None, return_state=False):
        u_BTC, gate_BTC = self.in_proj(x_BTD).chunk(2, dim=-1)
        conv_state = None if state is None else state["conv"]
        conv, _ = self._fns[impl_for(self.impl, self.args["impl"], x_BTD)]
        c_BTC, new_conv = conv(u_BTC, self.conv_weight, state_BCK=conv_state, activation="silu",
                                     gate_BTC=gate_BTC)  # silu(conv(u)) * gate, fused
        y_BTD = self.out_proj(c_BTC)
        if not return_state:
            return y_BTD
        if conv_state is not None:
            conv_state.copy_(new_conv)
            return y_BTD, state
        return y_BTD, {"conv": new_conv}

    def init_state(self, batch_size, *, max_seqlen, device=None, dtype=torch.float32):
        return {"conv": torch.zeros(batch_size, self.inner, self.kernel_size, device=device, dtype=dtype)}

    def step(self, x_BD, state):
        u_BC, gate_BC = self.in_proj(x_BD).chunk(2, dim=-1)
        _, conv_step = self._fns[impl_for(self.impl, self.args["impl"], x_BD)]
        c_BC = conv_step(u_BC, state["conv"], self.conv_weight, activation="silu", gate_BC=gate_BC)
        return self.out_proj(c_BC), state

    def state_bytes(self, batch_size, seqlen, dtype=torch.float32):
        return batch_size * self.inner * self.kernel_size * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def available_impls(cls, device: Union[str, torch.device] = "cpu") -> dict[str, Optional[str]]:
        return available_impls(device)

    def flops_per_token(self, seqlen: int) -> int:
        D, C = self.ctx.d_model, self.inner
        return 2 * (D * 2 * C + C * self.kernel_size + C * D)

    @classmethod
    def import_weights(cls, source: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The Based repo's BaseConv keeps the depthwise conv as nn.Conv1d `conv.conv.weight` [C, 1, K]: here
        `conv_weight` [C, K]; in_proj and out_proj (weights and biases) have the same names."""
        if source != "based-repo":
            return super().import_weights(source, tensors)
        w = tensors["conv.conv.weight"]
        out = {name: tensors[name] for name in ("in_proj.weight", "in_proj.bias", "out_proj.weight", "out_proj.bias")}
        return out | {"conv_weight": w.squeeze(1) if w.dim() == 3 else w}
