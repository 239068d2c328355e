"""Typed model configuration and the named architectures that ship with the package."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

# The published models of the Based paper, block by block (REFERENCE.md). One block = one residual branch.
# The attention baselines: RoPE dim int(0.5 * head_dim) (flash-attn's convention: 35 rotates 36 channels) and
# GatedMlp's int(8 d / 3) rounded up to a multiple of 256 (2816 at d 1024, 4608 at d 1680).
_BASED_360M = "conv,mlp,(based,mlp,swa:129,mlp,(conv,mlp)*3)*5,conv,mlp"
_BASED_1B = (
    "conv,mlp,(based,mlp,swa:129,mlp,(conv,mlp)*3)*5,conv,mlp,"
    "based,mlp,swa:129,mlp,(conv,mlp)*4,based,mlp,swa:129,mlp,conv,mlp"
)

NAMED_ARCHS: dict[str, dict[str, Any]] = {
    "based-360m": dict(spec=_BASED_360M, d_model=1024, n_heads=16),
    "based-1b": dict(spec=_BASED_1B, d_model=1792, n_heads=16),
    "attn-360m": dict(spec="(attn:rotary_dim=32,mlp:2816)*24", d_model=1024, n_heads=16, pad_vocab_multiple=16),
    "attn-1b": dict(spec="(attn:rotary_dim=35,mlp:4608)*36", d_model=1680, n_heads=24, pad_vocab_multiple=16),
    "mamba-360m": dict(spec="mamba*46", d_model=1024, n_heads=16),
    "mamba-1b": dict(spec="mamba*46", d_model=2048, n_heads=16),
}


@dataclass
class ModelConfig:
    """Everything needed to rebuild a HybridLM; `spec` is stored in canonical form."""

    spec: str
    d_model: int = 1024
    n_heads: int = 16
    vocab_size: int = 50257  # GPT-2 BPE
    pad_vocab_multiple: int = 8
    max_seqlen: int = 2048  # the context the model is built for (state/KV sizing, RoPE range)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = True

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - {"architectures", "model_type", "seqmix_version"})
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})


def resolve_model(
    spec_or_name: str,
    *,
    layers: Optional[int] = None,
    d_model: Optional[int] = None,
    n_heads: Optional[int] = None,
    vocab_size: Optional[int] = None,
    max_seqlen: Optional[int] = None,
    registry=None,
) -> ModelConfig:
    """A named architecture or a spec string (+ overrides) -> ModelConfig with the canonical spec.

    Raises seqmix.spec.SpecError for a bad spec (with a caret under the offending token).
    """
    from seqmix.registry import load_registry
    from seqmix.spec import format_spec, parse_spec

    registry = registry or load_registry()
    base: dict[str, Any] = dict(NAMED_ARCHS.get(spec_or_name.strip(), {"spec": spec_or_name}))
    for key, val in (("d_model", d_model), ("n_heads", n_heads), ("vocab_size", vocab_size),
                     ("max_seqlen", max_seqlen)):
        if val is not None:
            if val <= 0:
                raise ValueError(f"{key} must be positive, got {val}")
            base[key] = val
    layer_specs = parse_spec(base["spec"], registry, n_blocks=layers)
    base["spec"] = format_spec(layer_specs, registry)
    return ModelConfig(**base)
