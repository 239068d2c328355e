"""Model directories: config.json (canonical spec + sizes) and model.safetensors, written atomically."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

from seqmix.config import ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_pretrained(model, directory: Union[str, Path]) -> Path:
    """Write `model` (a HybridLM) to `directory`. The files appear all at once: they are written into a
    temporary sibling folder which then replaces `directory`, so a crash never leaves a half-written model."""
    from safetensors.torch import save_file

    from seqmix import __version__

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        cfg = {"model_type": "seqmix", "seqmix_version": __version__, **model.config.to_dict()}
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        # Tied weights share storage; safetensors stores each tensor once, so drop the alias.
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        publish_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def publish_dir(tmp: Path, final: Path) -> None:
    """Replace `final` by the finished folder `tmp` with renames only (the old folder goes once the new is in)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def load_config(directory: Union[str, Path]) -> ModelConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a seqmix model directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    return ModelConfig.from_dict(json.loads(path.read_text()))


def from_pretrained(directory: Union[str, Path], *, device="cpu", dtype=None, registry=None):
    """Rebuild the HybridLM saved in `directory`; a key or shape mismatch names the keys."""
    from safetensors.torch import load_file

    from seqmix.model import build_model

    config = load_config(directory)
    model = build_model(config, device=device, registry=registry)
    tensors = load_file(str(Path(directory) / WEIGHTS_NAME), device=str(device))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(tensors)) if tensors[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"checkpoint {directory} does not match its config: missing keys {missing}, "
            f"unexpected keys {unexpected}, shape mismatches {shapes}"
        )
    model.load_state_dict(tensors)
    return model.to(dtype) if dtype is not None else model

