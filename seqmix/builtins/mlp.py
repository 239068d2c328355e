"""`mlp`: the SwiGLU channel mixer of the Based models (fc1 -> [y | gate], fc2(silu(gate) * y))."""
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from seqmix.mixer import Arg, BlockContext, Mixer


class SwiGLU(Mixer):
    name = "mlp"
    description = "SwiGLU MLP (channel mixer), no bias"
    spec_args = (Arg("hidden", int, None, min=1, help="hidden width; default 2*d_model"),)
    state_kind = "none"

    def __init__(self, ctx: BlockContext, hidden=None):
        super().__init__(ctx)
        self.args = {"hidden": hidden}
        D = ctx.d_model
        self.hidden = 2 * D if hidden is None else hidden
        self.fc1 = nn.Linear(D, 2 * self.hidden, bias=False)  # D -> [y | gate]
        self.fc2 = nn.Linear(self.hidden, D, bias=False)
        nn.init.normal_(self.fc1.weight, std=ctx.init_std)
        nn.init.normal_(self.fc2.weight, std=ctx.out_init_std)

    def forward(self, x_BTD, *, state=None, return_state=False):
        y_BTF, gate_BTF = self.fc1(x_BTD).chunk(2, dim=-1)  # gate is the SECOND half
        out_BTD = self.fc2(F.silu(gate_BTF) * y_BTF)
        return (out_BTD, None) if return_state else out_BTD

    def step(self, x_BD: torch.Tensor, state=None):
        return self.forward(x_BD), None

    def flops_per_token(self, seqlen: int) -> int:
        return 2 * 3 * self.ctx.d_model * self.hidden

    @classmethod
    def import_weights(cls, source: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """transformers' LlamaMLP is down(silu(gate(x)) * up(x)): fc1 = [up_proj | gate_proj] (rows; the gate is
        fc1's second half), fc2 = down_proj. The Based repo's GatedMlp has this mixer's names (fc1, fc2)."""
        if source != "llama":
            return super().import_weights(source, tensors)
        return {"fc1.weight": torch.cat([tensors["up_proj.weight"], tensors["gate_proj.weight"]]),
                "fc2.weight": tensors["down_proj.weight"]}
