"""seqmix's own format: config.json (model_type "seqmix", the canonical spec) + safetensors weights, sharded when
large, written atomically; read back strictly."""
from __future__ import annotations

import dataclasses
import importlib.metadata as md
import json
from pathlib import Path
from typing import Optional, Union

import torch

from seqmix.config import ModelConfig
from seqmix.io.files import CONFIG_NAME, WEIGHTS_NAME, PathLike, parse_size, read_config_json, read_weights, write_weights
from seqmix.io.publish import staged_dir
from seqmix.io.strict import CheckpointFileError, load_strict
from seqmix.model import HybridLM, build_model

MODEL_TYPE = "seqmix"


def _version() -> str:
    try:
        return md.version("seqmix")
    except md.PackageNotFoundError:
        return "0+unknown"


def save(model: HybridLM, directory: PathLike, *, max_shard_size: Union[int, str] = "5GB", overwrite: bool = True,
         tokenizer: Optional[str] = None) -> Path:
    """Write `model` (a HybridLM) to `directory`: config.json and model.safetensors, or, when the weights exceed
    `max_shard_size` (bytes per file), model-0000i-of-0000N.safetensors + model.safetensors.index.json in the
    Hugging Face layout; with `tokenizer` (a seqmix.tokenizer name) also tokenizer_config.json.

    `directory` may be new, empty, or a seqmix model directory: then (the default, as for `save_pretrained`;
    `overwrite=False` refuses) its model files are replaced and every other file in it is kept. Any other
    non-empty folder is refused with a SaveRefusedError naming its files. The files appear all at once
    (seqmix.io.publish): a crash, a full disk (a SaveError) or a concurrent save to the same folder never
    leaves a half-written model."""
    parse_size(max_shard_size)  # a bad size fails before anything is written
    if tokenizer is not None:
        from seqmix.tokenizer import tokenizer_vocab_size

        tokenizer_vocab_size(tokenizer)  # an unknown name fails before anything is written
    # A tied head is `lm_head = None`, so the state dict holds no alias and every tensor is stored once.
    state = {k: v.detach() for k, v in model.state_dict().items()}
    with staged_dir(directory, overwrite=overwrite) as tmp:
        cfg = {"model_type": MODEL_TYPE, "seqmix_version": _version(), **model.config.to_dict()}
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        write_weights(state, tmp, max_shard_size)
        if tokenizer is not None:
            from seqmix.tokenizer import save_tokenizer_config

            save_tokenizer_config(tmp, tokenizer)
    return Path(directory)


_JSON_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def config_from_json(cfg: dict, path: Path) -> ModelConfig:
    """The ModelConfig a seqmix config.json (at `path`) holds; a missing spec, an unknown key or a value of the
    wrong type is a CheckpointFileError naming the file and the key."""
    fix = "fix it, or save the model again"
    problems = []
    for f in dataclasses.fields(ModelConfig):
        kinds = _JSON_TYPES.get(str(f.type), (object,))
        if f.name not in cfg:
            if f.default is dataclasses.MISSING:
                problems.append(f"lacks {f.name!r}")
        elif not isinstance(cfg[f.name], kinds) or (bool not in kinds and isinstance(cfg[f.name], bool)):
            problems.append(f"has {f.name}={cfg[f.name]!r}, not a{'n' if f.type == 'int' else ''} {f.type}")
    if problems:
        raise CheckpointFileError(f"{path} is not a valid seqmix config: it {'; '.join(problems)}; {fix}")
    try:
        return ModelConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointFileError(f"{path}: {e}; {fix}") from None


def load_config(directory: PathLike) -> ModelConfig:
    """The ModelConfig in a seqmix model directory's config.json."""
    path = Path(directory) / CONFIG_NAME
    return config_from_json(read_config_json(directory, f"a seqmix model directory holds {CONFIG_NAME} and "
                                                        f"{WEIGHTS_NAME}"), path)


def load_native(directory: PathLike, cfg: dict, *, device: Union[str, torch.device] = "cpu", registry=None) -> HybridLM:
    """The HybridLM of a seqmix directory whose config.json is `cfg`, built and read onto `device`; any key or
    shape that does not match the config is named (seqmix.io.strict)."""
    path = Path(directory) / CONFIG_NAME
    config = config_from_json(cfg, path)
    try:
        model = build_model(config, device=device, registry=registry)
    except (ValueError, KeyError) as e:  # SpecError, UnknownMixerError (a plugin not installed), bad sizes
        raise CheckpointFileError(f"{path} describes a model seqmix cannot build here: "
                                  f"{e.args[0] if isinstance(e, KeyError) and e.args else e}") from None
    tensors = read_weights(directory, device=device)
    if tensors and all(k.startswith("model.") for k in tensors):  # written by a wrapper holding it as `.model`
        tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
    return load_strict(model, tensors, what=f"checkpoint {directory} does not match its config ({config.spec})")
