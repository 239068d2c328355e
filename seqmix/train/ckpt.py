"""Atomic DeepSpeed checkpoints (save, find the last good one, resume) and the final model export.

Layout under <run_dir>/checkpoints/: `step00000100/` (DeepSpeed's files + one RNG file per rank) and `latest`
(DeepSpeed's own pointer file, holding the tag). A checkpoint is written by every rank into `.tmp-<tag>/`;
only when all ranks are done does rank 0 rename it to `<tag>/` and then replace `latest`, so a crash mid-save
leaves the previous checkpoint in charge and the half-written folder is deleted on the next start.
The checkpoint folder must be on a file system every rank sees (as DeepSpeed itself requires).
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from seqmix.train.dist import barrier

LATEST = "latest"
_TAG = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    """The tag of the last complete checkpoint, or None when there is none."""
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (Path(ckpt_dir) / tag).is_dir():
        raise FileNotFoundError(f"{pointer} names checkpoint {tag!r}, which is missing; delete {pointer} to "
                                "start over, or point it at an existing step folder")
    return tag


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int, rank: int) -> Path:
    """Collective: every rank calls it. Returns the published checkpoint folder."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(ckpt_dir / tmp_tag, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), ckpt_dir / tmp_tag / f"rng_rank{rank:05d}.pt")
    barrier()
    final = ckpt_dir / tag
    if rank == 0:
        if final.exists():  # the same step saved again (after a resume): replace it
            shutil.rmtree(final)
        os.replace(ckpt_dir / tmp_tag, final)
        _write_atomic(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep, tag)
    barrier()
    return final


def _prune(ckpt_dir: Path, keep: int, current: str) -> None:
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and _TAG.match(p.name))
    for tag in tags[: max(0, len(tags) - keep)]:
        if tag != current:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def load_checkpoint(engine, ckpt_dir: Path, rank: int) -> Optional[dict]:
    """Collective. Loads the last complete checkpoint into `engine` (weights, optimizer, LR schedule) and this
    rank's RNG state; returns the client state saved with it, or None when there is no checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    if rank == 0 and ckpt_dir.is_dir():
        for stale in ckpt_dir.glob(".tmp-*"):  # a save that never finished
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng = ckpt_dir / tag / f"rng_rank{rank:05d}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return client


def export_model(model, tokenizer_name: str, directory: Path, rank: int) -> Optional[Path]:
    """Collective. Write the fp32 master weights of `model` (a HybridLM inside a DeepSpeed engine, any ZeRO
    stage) as a seqmix model directory: config.json + model.safetensors + tokenizer_config.json."""
    from deepspeed.utils import safe_get_full_fp32_param

    from seqmix.io import save
    from seqmix.io.files import publish_dir
    from seqmix.model import build_model
    from seqmix.tokenizer import save_tokenizer_config

    full = {}
    for name, p in model.named_parameters():
        t = safe_get_full_fp32_param(p)  # gathers under ZeRO-3; None when there are no separate masters
        if rank == 0:
            full[name] = (p.detach() if t is None else t).float().cpu()
    out = None
    if rank == 0:
        directory = Path(directory)
        with torch.random.fork_rng(devices=[]):  # building draws an init; leave the training RNG alone
            fresh = build_model(model.config)
        state = fresh.state_dict()
        unknown = sorted(set(full) - set(state))
        if unknown:
            raise KeyError(f"export: parameters {unknown} are not in a freshly built model")
        state.update(full)
        fresh.load_state_dict(state)
        tmp = directory.with_name(f".{directory.name}.export-tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save(fresh, tmp)
        save_tokenizer_config(tmp, tokenizer_name)
        publish_dir(tmp, directory)
        out = directory
    barrier()
    return out
