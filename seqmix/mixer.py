"""The mixer contract: the one interface every sequence/channel mixer (built-in or plugin) implements."""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Optional, Union

import torch
from torch import nn

from seqmix_kernels.backend import triton_unavailable

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


def runs_anywhere(device: torch.device) -> Optional[str]:
    """The availability check of a pure-PyTorch implementation: it runs on every device."""
    return None


def triton_kernel(device: torch.device) -> Optional[str]:
    """The availability check of a Triton kernel: None on a CUDA device with triton installed (or under
    Triton's CPU interpreter, for tests), else what is missing."""
    return triton_unavailable(device)


IMPL_ROLES = ("kernel", "reference", "view")


@dataclass(frozen=True)
class Impl:
    """One entry of a mixer's implementation table (`Mixer.impls`: name -> Impl).

    role: "kernel" = a GPU kernel (`auto` takes the first one that can run on the layer's CUDA device);
        "reference" = the pure-PyTorch path `auto` takes otherwise (one per table); "view" = another
        pure-PyTorch path, used only when asked for by name (based:quadratic).
    unavailable(device): None if it can run on `device`, else what is missing (one sentence for an error).
    fits(mixer): None if this layer's sizes are supported, else why not (a kernel's head-dim limit).
    load(): its entry points, imported only when it is chosen; the mixer reads them as `self.ops[arg]`.
    """

    role: str = "reference"
    unavailable: Callable[[torch.device], Optional[str]] = runs_anywhere
    fits: Optional[Callable[["Mixer"], Optional[str]]] = None
    load: Optional[Callable[[], Any]] = None

    def why_not(self, mixer: "Mixer", device: torch.device) -> Optional[str]:
        return self.unavailable(device) or (self.fits(mixer) if self.fits is not None else None)


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


class MixerMeta(type):
    """Constructs mixers: binds and validates the declared args, runs `__init__`, then picks the implementations.

    `Cls(ctx, *args, **kwargs)` binds positional values in the order of `spec_args`, fills every declared arg's
    default, validates each with `Arg.convert`, sets `self.args` (the one copy) and calls
    `__init__(ctx, **args)` with all of them; after `__init__` every implementation arg is resolved once.
    """

    def __call__(cls, ctx: BlockContext, *args: Any, **kwargs: Any):
        validate_mixer_class(cls, once=True)
        bound = cls.bind_args(args, kwargs)
        self = cls.__new__(cls)
        object.__setattr__(self, "args", bound)  # readable from __init__ (set before nn.Module's own init)
        snapshot = dict(bound)
        self.__init__(ctx, **bound)
        if self.__dict__.get("args") is not bound or bound != snapshot:
            raise TypeError(f"mixer {cls.name!r}: __init__ changed self.args; the Mixer base sets it from the "
                            f"declared Args (remove the assignment; keep derived values in other attributes)")
        self._select_impls(self._device(), moved=False)
        return self


class Mixer(nn.Module, metaclass=MixerMeta):
    """Base class of every mixer. A subclass sets the ClassVars, accepts `(ctx, **spec_args)` in `__init__`
    (calling `super().__init__(ctx)` first) and implements the contract below; the base does the bookkeeping:
    `self.args` (every declared arg, validated), `self.impl` (the implementation chosen from `impls`, once per
    device: `auto` is re-resolved when the module moves) and `self.ops["impl"]` (what that Impl loaded).

    Shapes: x_BTD is [batch, time, d_model]; x_BD is one token per sequence.
    The state rules (checked by `seqmix.testing`):
      * A state is None (stateless) or a flat dict of tensors, each with the batch first ([B, ...]): rows can be
        gathered and scattered (generation groups prompts by length, beam search reorders rows).
      * forward(x, state=None) equals forward(x, state=init_state(B, max_seqlen=T)).
      * forward(x2, state=forward(x1, return_state=True)[1]) equals forward(cat(x1, x2))[:, T1:]; a given state
        is updated in place and returned.
      * prefill(x, state) on a fresh init_state equals forward(x) and leaves the state forward would return.
      * step(x_t, state) equals forward at position t and updates the state's tensors in place (CUDA graphs).
      * state_bytes(B, T, dtype) equals the bytes init_state(B, max_seqlen=T, dtype=dtype) allocates.
    """

    name: ClassVar[str]
    spec_args: ClassVar[tuple[Arg, ...]] = ()
    state_kind: ClassVar[str] = "none"
    description: ClassVar[str] = ""
    impls: ClassVar[dict[str, Impl]] = {"reference": Impl()}
    """The implementations of the `impl` arg (the mixer declares `Arg("impl", str, "auto", choices=("auto",
    *impls))`); a mixer without an `impl` arg runs its reference."""
    extra_impls: ClassVar[dict[str, dict[str, Impl]]] = {}
    """Tables for further implementation args (mamba's `conv_impl`), resolved the same way into self.<arg>."""

    args: dict[str, Any]

    def __init__(self, ctx: BlockContext):
        super().__init__()
        self.ctx = ctx

    # -- the contract -----------------------------------------------------------------------------
    def forward(
        self, x_BTD: torch.Tensor, *, state: State = None, return_state: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, State]]:
        raise NotImplementedError

    def prefill(self, x_BTD: torch.Tensor, state: State) -> torch.Tensor:
        """The first chunk of fresh sequences: y_BTD, with `state` (fresh, from init_state) filled in place.

        Default: forward(x, return_state=True) (the fresh path) and a copy into the preallocated tensors;
        override where the preallocated state has another shape than forward's (a KV cache of max_seqlen).
        """
        if state is None:
            return self.forward(x_BTD)
        y_BTD, new = self.forward(x_BTD, return_state=True)
        for k, v in state.items():
            if new[k].shape != v.shape:
                raise RuntimeError(f"{self.name}.prefill: forward's state {k!r} has shape {tuple(new[k].shape)}, "
                                   f"the preallocated one {tuple(v.shape)}; override prefill to fill it")
            v.copy_(new[k])
        return y_BTD

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

    # -- the bookkeeping --------------------------------------------------------------------------
    @classmethod
    def bind_args(cls, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Every declared arg by name: positional values in declaration order, then keywords, then defaults;
        each validated (None stays None where the default is None: "inherit from the model")."""
        declared = [a.name for a in cls.spec_args]
        if len(args) > len(declared):
            raise TypeError(f"mixer {cls.name!r} takes {len(declared)} args ({', '.join(declared) or 'none'}), "
                            f"got {len(args)} positional")
        given = dict(zip(declared, args))
        for k, v in kwargs.items():
            if k not in declared:
                raise TypeError(f"mixer {cls.name!r} has no arg {k!r}; its args: {', '.join(declared) or 'none'}")
            if k in given:
                raise TypeError(f"mixer {cls.name!r}: arg {k!r} given twice")
            given[k] = v
        bound = {}
        for a in cls.spec_args:
            v = given.get(a.name, a.default)
            bound[a.name] = None if v is None and a.default is None else a.convert(v)
        return bound

    @classmethod
    def impl_tables(cls) -> dict[str, dict[str, Impl]]:
        """Implementation arg name -> its table (`impl` -> `impls`, plus `extra_impls`)."""
        return {"impl": cls.impls, **cls.extra_impls}

    @classmethod
    def available_impls(cls, device: Union[str, torch.device] = "cpu") -> dict[str, Optional[str]]:
        """Map of implementation name -> None if it can run on `device`, else the reason it cannot."""
        dev = torch.device(device)
        return {n: i.unavailable(dev) for n, i in cls.impls.items()}

    def _device(self) -> Optional[torch.device]:
        t = next(iter(self.parameters()), None)
        t = next(iter(self.buffers()), None) if t is None else t
        return None if t is None else t.device

    def _select_impls(self, device: Optional[torch.device], *, moved: bool) -> None:
        """Set self.<arg> and self.ops[arg] for every implementation arg. `auto` resolves against the layer's
        device (a meta or parameterless layer: this machine's); a named implementation is checked once, at
        construction, against this machine and never swapped."""
        machine = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device is None or device.type == "meta":
            device = machine
        ops = dict(getattr(self, "ops", {}))
        for arg, table in self.impl_tables().items():
            asked = self.args.get(arg, "auto")
            if moved and asked != "auto":
                continue
            chosen = self._choose(arg, table, asked, device if asked == "auto" else machine)
            if chosen == self.__dict__.get(arg) and arg in ops:
                continue
            object.__setattr__(self, arg, chosen)
            ops[arg] = table[chosen].load() if table[chosen].load is not None else None
            if arg in self.args:
                _log.debug("%s layer %d: %s=%s (asked %s%s)", self.name, self.ctx.layer_idx, arg, chosen, asked,
                           f", moved to {device}" if moved else "")
        object.__setattr__(self, "ops", ops)

    def _choose(self, arg: str, table: dict[str, Impl], asked: str, device: torch.device) -> str:
        if asked == "auto":  # kernels only for a CUDA layer (never Triton's CPU interpreter), then the reference
            order = [n for n, i in table.items() if i.role == "kernel" and device.type == "cuda"]
            order += [n for n, i in table.items() if i.role == "reference"]
            reasons = {n: table[n].why_not(self, device) for n in order}
            chosen = next((n for n in order if reasons[n] is None), None)
            if chosen is None:
                raise RuntimeError(f"{self.name}: no {arg} can run on {device}: {reasons}")
            return chosen
        why = table[asked].why_not(self, device)
        if why is not None:
            runnable = ", ".join(["auto"] + [n for n, i in table.items() if i.why_not(self, device) is None])
            raise RuntimeError(f"{self.name} {arg}={asked!r} cannot run on this machine ({device}): {why}. "
                               f"Use one of: {runnable}.")
        return asked

    def select_impls(self, device: Union[str, torch.device, None] = None) -> None:
        """Re-resolve the args asked as `auto` for `device` (default: where the parameters are now). Moves call
        it themselves; a loader that assigns parameters in place (transformers') calls it after loading."""
        self._select_impls(self._device() if device is None else torch.device(device), moved=True)

    def _apply(self, fn, recurse: bool = True):
        """Moving the module (`.to`, `.cuda`, `.cpu`, `to_empty`) re-resolves the args asked as `auto`."""
        out = super()._apply(fn, recurse)
        if "ops" in self.__dict__:  # constructed (not a move from inside __init__)
            self.select_impls()
        return out

    def extra_repr(self) -> str:
        chosen = [f"{a}={self.__dict__[a]}" for a in self.impl_tables() if self.args.get(a) == "auto"]
        return ", ".join([self.spec_repr()] + [f"resolved {c}" for c in chosen])

    def spec_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.args.items())


def validate_mixer_class(cls: type, *, once: bool = False) -> None:
    """Registration checks of a Mixer subclass: a name, a known state kind, implementation tables whose roles are
    known (one reference each) and match the declared `impl` choices, and an `__init__` that accepts every
    declared arg. Raises TypeError naming the mixer and what is wrong. `once`: skip a class already checked."""
    if once and cls.__dict__.get("_contract_checked"):
        return
    if not (isinstance(cls, type) and issubclass(cls, Mixer)):
        raise TypeError(f"{cls!r} is not a subclass of seqmix.mixer.Mixer")
    label = f"mixer {getattr(cls, 'name', None)!r} ({cls.__module__}.{cls.__qualname__})"
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} has no `name`")
    if cls.state_kind not in STATE_KINDS:
        raise TypeError(f"{label}: state_kind must be one of {STATE_KINDS}, got {cls.state_kind!r}")
    declared = {a.name: a for a in cls.spec_args}
    for arg, table in cls.impl_tables().items():
        bad = {n: i.role for n, i in table.items() if i.role not in IMPL_ROLES}
        if bad:
            raise TypeError(f"{label}: {arg} roles must be one of {IMPL_ROLES}, got {bad}")
        if sum(i.role == "reference" for i in table.values()) != 1:
            raise TypeError(f"{label}: the {arg} table needs exactly one Impl(role='reference'), the path `auto` "
                            f"falls back to; it has {[n for n, i in table.items() if i.role == 'reference']}")
        if arg in declared and tuple(declared[arg].choices or ()) != ("auto", *table):
            raise TypeError(f"{label}: Arg({arg!r}) choices {declared[arg].choices} must be ('auto', "
                            f"{', '.join(map(repr, table))}), the names of its table")
        if arg != "impl" and arg not in declared:
            raise TypeError(f"{label}: extra_impls names {arg!r}, which is not a declared Arg")
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for name in declared:
            p = params.get(name)
            if p is None or p.kind not in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
                raise TypeError(f"{label}: __init__ does not accept the declared arg {name!r} as a keyword; "
                                f"add `{name}=...` to its parameters (the base passes every declared arg)")
    type.__setattr__(cls, "_contract_checked", True)


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
