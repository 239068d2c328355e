"""`load`: any model directory or hub name to a HybridLM, dispatching on config.json's `model_type` over the
registered importers (seqmix's own format first)."""
from __future__ import annotations

from typing import Optional, Union

import torch

from seqmix.io.files import PathLike, read_config_json
from seqmix.io.hub import resolve_model_dir
from seqmix.io.native import MODEL_TYPE, load_native
from seqmix.io.strict import ConversionError
from seqmix.model import HybridLM
from seqmix.registry import load_registry


def find_importer(cfg: dict, registry):
    """The registry entry of the importer for config.json `cfg`: the one registered under its `model_type`, else
    the first whose `detect(cfg)` says the format is its own (the Based repo's configs carry no model_type)."""
    entry = registry.importers.get(cfg.get("model_type"))
    if entry is None:
        entry = next((e for e in registry.importers.values() if e.detect is not None and e.detect(cfg)), None)
    if entry is None:
        known = ", ".join(sorted(registry.importers)) or "none"
        problems = "".join(f"\nPlugin {p.plugin} ({p.dist}) failed to load: {p.message}" for p in registry.problems)
        raise ConversionError(f"config.json (model_type {cfg.get('model_type')!r}) is neither a seqmix model nor a "
                              f"format an installed importer reads (registered: {known}); seqmix cannot load it"
                              + problems)
    return entry


def load(name_or_path: PathLike, *, device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
         registry=None, revision: Optional[str] = None, cache_dir: Optional[PathLike] = None,
         local_files_only: bool = False) -> HybridLM:
    """A HybridLM from a model directory or a Hugging Face hub name "org/name" (seqmix.io.hub.resolve_model_dir
    with `revision`, `cache_dir`, `local_files_only`).

    A seqmix directory (model_type "seqmix") is read as saved, single-file or sharded, onto `device`. Any other
    config.json goes to the registered importer of its format (built in: the Based repo's checkpoints,
    transformers "llama" and "mamba"; plugins add more through `seqmix_register_importers`), which builds the
    model on the CPU. A key or shape mismatch names the keys. The model is then cast to `dtype` and moved to
    `device`."""
    directory = resolve_model_dir(name_or_path, revision=revision, cache_dir=cache_dir,
                                  local_files_only=local_files_only)
    cfg = read_config_json(directory)
    if cfg.get("model_type") == MODEL_TYPE:
        model = load_native(directory, cfg, device=device, registry=registry)
        return model.to(dtype) if dtype is not None else model
    registry = registry or load_registry()
    model = find_importer(cfg, registry).importer(directory, cfg, registry)
    return model.to(device=device, dtype=dtype)
