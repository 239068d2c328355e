"""The mixer contract: the one interface every sequence/channel mixer (built-in or plugin) implements."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Union

import torch
from torch import nn

from seqmix_kernels.backend import impl_for as _impl_for

_log = logging.getLogger("seqmix.mixer")

# A mixer's decode state: named tensors (so CUDA graphs can update them in place), or None (stateless).
State = Optional[dict[str, torch.Tensor]]

STATE_KINDS = ("none", "recurrent", "window", "cache")
"""none: stateless (mlp). recurrent: constant size, independent of length (based, mamba).
window: constant size, the last W inputs (conv, swa). cache: grows with the sequence (attn)."""


class ArgError(ValueError):
    """A spec argument failed validation; the message names the field and the accepted values."""


@dataclass(frozen=True)
class Arg:
    """One spec argument a mixer declares: `swa:64` binds 64 to the first positional Arg, `window`.

    `default=None` means "inherit from the model" (e.g. `heads` falls back to the model's `n_heads`).
    """

    name: str
    type: type  # int, float, str or bool
    default: Any = None
    choices: Optional[tuple] = None
    min: Optional[float] = None
    max: Optional[float] = None
    positional: bool = True
    help: str = ""

    def convert(self, value: Any) -> Any:
        """Turn a raw spec token (str) or a Python value into a validated value of `self.type`."""
        v = value
        if isinstance(value, str) and self.type is not str:
            try:
                if self.type is bool:
                    low = value.lower()
                    if low not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    v = low in ("true", "1", "yes")
                else:
                    v = self.type(value)
            except ValueError:
                raise ArgError(
                    f"{self.name} must be {self.type.__name__}, got {value!r}" + self._accepted()
                ) from None
        elif self.type is float and isinstance(value, int) and not isinstance(value, bool):
            v = float(value)
        if not isinstance(v, self.type) or (self.type is int and isinstance(v, bool)):
            raise ArgError(f"{self.name} must be {self.type.__name__}, got {value!r}" + self._accepted())
        if self.choices is not None and v not in self.choices:
            raise ArgError(f"{self.name} must be one of {', '.join(map(str, self.choices))}; got {v!r}")
        if self.min is not None and v < self.min:
            raise ArgError(f"{self.name} must be >= {self.min:g}, got {v!r}" + self._accepted())
        if self.max is not None and v > self.max:
            raise ArgError(f"{self.name} must be <= {self.max:g}, got {v!r}" + self._accepted())
        return v

    def _accepted(self) -> str:
        if self.choices is not None:
            return f" (one of {', '.join(map(str, self.choices))})"
        lo = "" if self.min is None else f"{self.min:g} <= "
        hi = "" if self.max is None else f" <= {self.max:g}"
        return f" ({lo}{self.name}{hi})" if (lo or hi) else ""

    def describe(self) -> str:
        d = "model" if self.default is None else repr(self.default)
        return f"{self.name}:{self.type.__name__}={d}"


@dataclass(frozen=True)
class BlockContext:
    """What a mixer knows about the model it sits in."""

    d_model: int
    n_heads: int  # the model's default head count; a mixer's own `heads` arg overrides it
    layer_idx: int = 0  # index of this block in the stack
    n_blocks: int = 1  # total blocks (residual branches), for the output-projection init scale
    init_std: float = 0.02

    @property
    def out_init_std(self) -> float:
        """Std of output projections: 0.02/sqrt(2*n_layer) in the Based repo, where 2*n_layer = blocks."""
        return self.init_std / (self.n_blocks ** 0.5)


class Mixer(nn.Module):
    """Base class. Subclasses set the ClassVars, accept `(ctx, **spec_args)` and implement the methods.

    Shapes: x_BTD is [batch, time, d_model]; x_BD is one token per sequence.
    Semantics every implementation must honour (checked by `seqmix.testing`):
      * forward(x, state=None) equals forward(x, state=init_state(B, max_seqlen=T)).
      * forward(x2, state=forward(x1, return_state=True)[1]) equals forward(cat(x1, x2))[:, T1:].
      * step(x_t, state) equals forward at position t; step may update state in place.
      * state_bytes(B, T, dtype) equals the bytes init_state(B, max_seqlen=T, dtype=dtype) allocates.
    """

    name: ClassVar[str]
    spec_args: ClassVar[tuple[Arg, ...]] = ()
    state_kind: ClassVar[str] = "none"
    description: ClassVar[str] = ""

    def __init__(self, ctx: BlockContext):
        super().__init__()
        self.ctx = ctx

    # -- the contract -----------------------------------------------------------------------------
    def forward(
        self, x_BTD: torch.Tensor, *, state: State = None, return_state: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, State]]:
        raise NotImplementedError

    def init_state(
        self, batch_size: int, *, max_seqlen: int, device=None, dtype: torch.dtype = torch.float32
    ) -> State:
        return None

    def step(self, x_BD: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        y = self.forward(x_BD[:, None])
        return y[:, 0], state

    def state_bytes(self, batch_size: int, seqlen: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes init_state allocates, measured on the meta device (nothing is allocated). A subclass may
        override with a closed formula; the conformance suite checks it against the real allocation."""
        return state_nbytes(self.init_state(batch_size, max_seqlen=seqlen, device="meta", dtype=dtype))

    def flops_per_token(self, seqlen: int) -> int:
        """Forward FLOPs (2 per multiply-add) for one token at context length `seqlen`."""
        return 2 * sum(p.numel() for p in self.parameters() if p.dim() >= 2)

    # -- implementations --------------------------------------------------------------------------
    @classmethod
    def available_impls(cls, device: Union[str, torch.device] = "cpu") -> dict[str, Optional[str]]:
        """Map of implementation name -> None if it can run on `device`, else the reason it cannot."""
        return {"reference": None}

    def resolve_impl(self, impl: str, preference: tuple[str, ...],
                     avail: Optional[dict[str, Optional[str]]] = None, *, reference: str = "reference") -> str:
        """Choose the implementation once, at construction, for this machine (CUDA if it has one).

        `auto` takes the first name in `preference` that can run; an explicit name that cannot run raises an
        error that says why and lists those that can. `avail` overrides `available_impls(device)` where a layer's
        own sizes rule a path out. `reference` is the pure-PyTorch twin that `impl_for` uses under `auto` for
        tensors off CUDA. The choice is logged once, at debug level.
        """
        self._impl_asked, self._impl_reference = impl, reference
        device = "cuda" if torch.cuda.is_available() else "cpu"
        avail = self.available_impls(device) if avail is None else avail
        if impl == "auto":
            chosen = next((n for n in preference if avail.get(n, "unknown") is None), None)
            if chosen is None:
                raise RuntimeError(f"{self.name}: no implementation can run on {device}: {avail}")
        elif impl not in avail:
            raise ArgError(f"{self.name} impl must be one of auto, {', '.join(avail)}; got {impl!r}")
        elif avail[impl] is not None:
            runnable = ", ".join(["auto"] + [k for k, why in avail.items() if why is None])
            raise RuntimeError(f"{self.name} impl={impl!r} cannot run on this machine ({device}): {avail[impl]}. "
                               f"Use one of: {runnable}.")
        else:
            chosen = impl
        _log.debug("%s layer %d: impl=%s (asked %s)", self.name, self.ctx.layer_idx, chosen, impl)
        return chosen

    def impl_for(self, x: torch.Tensor) -> str:
        """The implementation for tensors like `x`: `self.impl` on CUDA, or whenever it was named explicitly;
        under impl=auto, tensors on other devices (a CPU copy of a model built on a GPU machine) take the
        reference twin."""
        return _impl_for(self.impl, self._impl_asked, x, self._impl_reference)

    def extra_repr(self) -> str:
        return self.spec_repr()

    def spec_repr(self) -> str:
        args = getattr(self, "args", {})
        return ", ".join(f"{k}={v}" for k, v in args.items())

    # -- foreign checkpoints ----------------------------------------------------------------------
    @classmethod
    def import_weights(cls, source: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This mixer's parameters (its own names, e.g. "out_proj.weight") from one layer of a foreign checkpoint.

        `source` names the format (the model_type its importer registered: "based-repo", "llama", "mamba", or a
        plugin's); `tensors` holds the layer's tensors under the checkpoint's names, its layer prefix removed
        (e.g. "q_proj.weight" of "model.layers.3.self_attn."). Fuse, split or reshape as the format needs. Read
        the names you use with `tensors[name]`: a missing one raises KeyError, which the importer reports as a
        missing key of that layer, and every tensor you do not read is reported as unexpected. The default
        keeps every name as is (a format that uses this mixer's own names)."""
        return dict(tensors)


def state_nbytes(state: Any) -> int:
    """Bytes held by the tensors of a state (dict / tuple / list of tensors, or None)."""
    if state is None:
        return 0
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    raise TypeError(f"unsupported state element {type(state).__name__}")


def resolve_heads(ctx: BlockContext, heads: Optional[int], width: int, what: str = "heads") -> int:
    """The head count (the mixer's own or the model's), checked to divide `width`."""
    h = ctx.n_heads if heads is None else heads
    if h <= 0 or width % h:
        raise ArgError(f"{what}={h} must divide the width {width}")
    return h
