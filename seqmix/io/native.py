"""seqmix's own format: config.json (model_type "seqmix", the canonical spec) + safetensors weights, sharded when
large, written atomically; read back strictly."""
from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path
from typing import Union

import torch

from seqmix.config import ModelConfig
from seqmix.io.files import CONFIG_NAME, WEIGHTS_NAME, PathLike, parse_size, read_weights, staged_dir, write_weights
from seqmix.io.strict import load_strict
from seqmix.model import HybridLM, build_model

MODEL_TYPE = "seqmix"


def _version() -> str:
    try:
        return md.version("seqmix")
    except md.PackageNotFoundError:
        return "0+unknown"


def save(model: HybridLM, directory: PathLike, *, max_shard_size: Union[int, str] = "5GB") -> Path:
    """Write `model` (a HybridLM) to `directory`: config.json and model.safetensors, or, when the weights exceed
    `max_shard_size` (bytes per file), model-0000i-of-0000N.safetensors + model.safetensors.index.json in the
    Hugging Face layout. The files appear all at once: they are written into a temporary sibling folder which then
    replaces `directory`, so a crash never leaves a half-written model."""
    parse_size(max_shard_size)  # a bad size fails before anything is written
    directory = Path(directory)
    # A tied head is `lm_head = None`, so the state dict holds no alias and every tensor is stored once.
    state = {k: v.detach() for k, v in model.state_dict().items()}
    with staged_dir(directory) as tmp:
        cfg = {"model_type": MODEL_TYPE, "seqmix_version": _version(), **model.config.to_dict()}
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        write_weights(state, tmp, max_shard_size)
    return directory


def load_config(directory: PathLike) -> ModelConfig:
    """The ModelConfig in a seqmix model directory's config.json."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a seqmix model directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    return ModelConfig.from_dict(json.loads(path.read_text()))


def load_native(directory: PathLike, cfg: dict, *, device: Union[str, torch.device] = "cpu", registry=None) -> HybridLM:
    """The HybridLM of a seqmix directory whose config.json is `cfg`, built and read onto `device`; any key or
    shape that does not match the config is named (seqmix.io.strict)."""
    config = ModelConfig.from_dict(cfg)
    model = build_model(config, device=device, registry=registry)
    tensors = read_weights(directory, device=device)
    if tensors and all(k.startswith("model.") for k in tensors):  # written by a wrapper holding it as `.model`
        tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
    return load_strict(model, tensors, what=f"checkpoint {directory} does not match its config ({config.spec})")
