"""seqmix: hybrid sequence models assembled from a short spec string.

The public face, imported lazily (`import seqmix` loads neither torch nor transformers nor triton):

    model = seqmix.build("based,swa64,mlp", layers=6, d_model=256, n_heads=4)
    seqmix.save(model, "runs/m"); model = seqmix.load("runs/m")
    seqmix.parse_spec / seqmix.format_spec; seqmix.Mixer, seqmix.Arg, seqmix.hookimpl for plugins
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["build", "load", "save", "parse_spec", "format_spec", "Mixer", "Arg", "hookimpl", "__version__"]

_LAZY = {"parse_spec": "seqmix.spec", "format_spec": "seqmix.spec", "Mixer": "seqmix.mixer", "Arg": "seqmix.mixer",
         "hookimpl": "seqmix.hookspecs"}


def build(spec_or_name: str, *, layers=None, d_model=None, n_heads=None, vocab_size=None, max_seqlen=None,
          device="cpu", dtype=None, registry=None):
    """A HybridLM with fresh weights from a spec string or a named architecture (`based-360m`); the sizes
    override the named ones (seqmix.config.resolve_model, seqmix.model.build_model)."""
    from seqmix.config import resolve_model
    from seqmix.model import build_model

    config = resolve_model(spec_or_name, layers=layers, d_model=d_model, n_heads=n_heads, vocab_size=vocab_size,
                           max_seqlen=max_seqlen, registry=registry)
    return build_model(config, device=device, dtype=dtype, registry=registry)


def load(name_or_path, **kwargs):
    """A model from a seqmix directory, an importable checkpoint or a hub name (seqmix.io.load)."""
    from seqmix.io import load as _load

    return _load(name_or_path, **kwargs)


def save(model, directory, **kwargs):
    """config.json + safetensors in `directory`, written atomically (seqmix.io.save)."""
    from seqmix.io import save as _save

    return _save(model, directory, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'seqmix' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
