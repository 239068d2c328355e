"""Atomic DeepSpeed checkpoints (save, find the last good one, resume) and the final model export.

Layout under <run_dir>/checkpoints/: `step00000100/` (DeepSpeed's files, `seqmix_state.json` with the step and
recipe, and one RNG file per rank) and `latest` (DeepSpeed's own pointer file, holding the tag). A checkpoint is
written by every rank into `.tmp-<tag>/`; only when all ranks are done does rank 0 rename it to `<tag>/` and
then replace `latest`, so a crash mid-save leaves the previous checkpoint in charge and the half-written folder
is deleted on the next start. The checkpoint folder must be on a file system every rank sees (as DeepSpeed
itself requires).

seqmix's own files hold no pickled objects: the state is JSON and the RNG files are tensors plus a JSON string,
read with `torch.load(weights_only=True)`. DeepSpeed's files (`mp_rank_*_model_states.pt`, the optimizer
shards) are pickles that `deepspeed.load_checkpoint` unpickles: resume only from run directories you trust.
Before any of them is read, `latest` must name a step folder of this run and the saved recipe must match.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from seqmix.train.dist import barrier

LATEST = "latest"
STATE_NAME = "seqmix_state.json"  # {"format", "step", "recipe"}, written by rank 0 into each checkpoint
STATE_FORMAT = 1
_TAG = re.compile(r"^step(\d{8})$")


class CheckpointError(ValueError):
    """A run directory's checkpoints cannot be resumed safely; the message names the file and the fix."""


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
    """The tag of the last complete checkpoint, or None when there is none. `latest` must name a step folder
    directly inside `ckpt_dir` (never a path elsewhere, nor a link out of it)."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    raw = pointer.read_bytes()
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        tag = None
    if tag is None or not _TAG.match(tag):
        raise CheckpointError(
            f"{pointer} should hold the name of a checkpoint folder of this run (like step00000100) but holds "
            f"{raw[:80]!r}: it is corrupt or was not written by seqmix. Write the name of one of the step folders "
            f"in {ckpt_dir} into it, or delete it to start the run over")
    folder = ckpt_dir / tag
    if not folder.is_dir():
        raise CheckpointError(f"{pointer} names checkpoint {tag!r}, which is missing; delete {pointer} to "
                              "start over, or point it at an existing step folder")
    if folder.resolve().parent != ckpt_dir.resolve():
        raise CheckpointError(f"{folder} links to {folder.resolve()}, outside this run's checkpoints; seqmix "
                              "resumes only from folders inside the run directory")
    return tag


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and one JSON string (what `torch.load(weights_only=True)` reads)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "json": json.dumps({"python": [version, list(internal), gauss],
                            "numpy": [kind, int(pos), int(has_gauss), float(cached)]}),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    meta = json.loads(state["json"])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_rng_state(path: Path) -> dict[str, Any]:
    """Read an RNG file with `weights_only=True`: a file holding anything but tensors and strings is refused."""
    fix = (f"seqmix runs no code from a run directory; delete {path.parent} to resume from an earlier "
           "checkpoint, or start a new train.run_dir")
    try:
        state = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a seqmix RNG file of tensors and JSON: torch refused to read it "
                              f"with weights_only=True ({first[:200]}). It is damaged, was written by an older "
                              f"seqmix (a pickle), or by someone else; {fix}") from None
    ok = (isinstance(state, dict) and isinstance(state.get("json"), str)
          and all(isinstance(state.get(k), torch.Tensor) for k in ("torch", "numpy_keys")))
    if not ok:
        raise CheckpointError(f"{path} does not hold seqmix's RNG state (tensors torch, numpy_keys and a json "
                              f"string); {fix}")
    return state


def read_state(folder: Path) -> dict[str, Any]:
    """The step and recipe a checkpoint folder records in seqmix_state.json (checked before DeepSpeed loads)."""
    path = Path(folder) / STATE_NAME
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no {STATE_NAME}: it was written by an older seqmix or is not a "
                              "seqmix checkpoint; start a new train.run_dir (or delete its checkpoints/)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); delete {folder} to resume from an earlier "
                              "checkpoint") from None
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("recipe"), dict)):
        raise CheckpointError(f"{path} does not hold a step and a recipe; delete {folder} to resume from an earlier "
                              "checkpoint")
    return state


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
    if rank == 0:
        _write_atomic(ckpt_dir / tmp_tag / STATE_NAME,
                      json.dumps({"format": STATE_FORMAT, **client_state}, indent=1) + "\n")
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


UNIVERSAL = "universal"  # a checkpoint re-laid out for another world size (DeepSpeed's universal format)


def saved_world_size(folder: Path) -> int:
    """Ranks that wrote the checkpoint in `folder` (each writes its own rng_rankNNNNN.pt)."""
    return len(list(Path(folder).glob("rng_rank*.pt")))


def prepare_resume(ckpt_dir: Path, world: int, rank: int, check: Optional[Callable[[dict], None]] = None,
                   check_reshard: Optional[Callable[[dict, int], None]] = None) -> Optional[Path]:
    """Collective, before the engine is built. When the last checkpoint was written by another number of ranks,
    rank 0 converts it once into DeepSpeed's universal format (`<step>/universal/`, built in a temporary folder
    and renamed, so a killed conversion leaves nothing half done); returns that folder, which the engine must
    then be built to load (ds_config checkpoint.load_universal), or None when the layouts already match.
    `check(recipe)` and then `check_reshard(recipe, saved_world_size)` run before anything of DeepSpeed's is read
    (the conversion unpickles its files); either may raise."""
    ckpt_dir = Path(ckpt_dir)
    tag = latest_tag(ckpt_dir)
    if tag is None or saved_world_size(ckpt_dir / tag) in (0, world):
        return None
    saved = read_state(ckpt_dir / tag)["recipe"]
    if check is not None:
        check(saved)
    if check_reshard is not None:
        check_reshard(saved, saved_world_size(ckpt_dir / tag))
    out = ckpt_dir / tag / UNIVERSAL
    if rank == 0 and not out.is_dir():
        import argparse
        import contextlib
        import io

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = ckpt_dir / tag / f".tmp-{UNIVERSAL}"
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.redirect_stdout(io.StringIO()):  # the converter narrates its steps on stdout
            ds_to_universal(argparse.Namespace(
                input_folder=str(ckpt_dir / tag), output_folder=str(tmp / UNIVERSAL), num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
        os.replace(tmp / UNIVERSAL, out)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    return out


def load_checkpoint(engine, ckpt_dir: Path, rank: int,
                    check: Optional[Callable[[dict], None]] = None, universal: bool = False) -> Optional[dict]:
    """Collective. Loads the last complete checkpoint into `engine` (weights, optimizer, LR schedule) and this
    rank's RNG state; returns the state saved with it ({"step", "recipe"}), or None when there is none.
    `check(state)` runs first and may raise (a different model): then nothing is loaded. universal: load the
    copy `prepare_resume` made for this world size (a rank the old run did not have keeps its seeded RNG)."""
    ckpt_dir = Path(ckpt_dir)
    if rank == 0 and ckpt_dir.is_dir():
        for stale in ckpt_dir.glob(".tmp-*"):  # a save that never finished
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    state = read_state(ckpt_dir / tag)
    if check is not None:
        check(state["recipe"])
    rng_path = ckpt_dir / tag / f"rng_rank{rank:05d}.pt"
    rng = load_rng_state(rng_path) if rng_path.is_file() else None  # refused before DeepSpeed reads anything
    load_dir, load_tag = (ckpt_dir / tag, UNIVERSAL) if universal else (ckpt_dir, tag)
    path, _ = engine.load_checkpoint(str(load_dir), tag=load_tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    if rng is not None:
        set_rng_state(rng)
    return state


def check_export_dir(export_dir: Path, run_dir: Path) -> Optional[str]:
    """Why the final model cannot be exported to `export_dir` (checked before training starts), or None: it must
    not be the run directory or hold it (seqmix.io.save keeps other files, but the run's own files do not belong
    in a model folder), nor a folder the save would refuse (not empty and not a seqmix model directory). A seqmix
    model directory is replaced: the run re-exports its own model/ when it resumes or finishes again."""
    from seqmix.io.publish import SaveRefusedError, check_target, target_dir

    e, r = target_dir(export_dir).resolve(), Path(run_dir).resolve()
    if e == r or e in r.parents or (e.parent == r and e.name in ("checkpoints", "tensorboard")):
        return (f"train.export_dir={export_dir} would put the model among the run's own files in {run_dir}; "
                f"leave it unset (the model goes to {Path(run_dir) / 'model'}) or name a folder of its own")
    try:
        check_target(e, overwrite=True)
    except SaveRefusedError as err:
        return f"train.export_dir: {err}"
    return None


def export_model(model, tokenizer_name: str, directory: Path, rank: int) -> Optional[Path]:
    """Collective. Write the fp32 master weights of `model` (a HybridLM inside a DeepSpeed engine, any ZeRO
    stage) as a seqmix model directory: config.json + model.safetensors + tokenizer_config.json, all at once
    (seqmix.io.save, overwrite=True: a model directory there, the run's own from an earlier finish, is replaced;
    its other files are kept; any other non-empty folder is refused)."""
    from deepspeed.utils import safe_get_full_fp32_param

    from seqmix.io import save
    from seqmix.model import build_model

    full = {}
    for name, p in model.named_parameters():
        t = safe_get_full_fp32_param(p)  # gathers under ZeRO-3; None when there are no separate masters
        if rank == 0:
            full[name] = (p.detach() if t is None else t).float().cpu()
    out = None
    if rank == 0:
        with torch.random.fork_rng(devices=[]):  # building draws an init; leave the training RNG alone
            fresh = build_model(model.config)
        state = fresh.state_dict()
        unknown = sorted(set(full) - set(state))
        if unknown:
            raise KeyError(f"export: parameters {unknown} are not in a freshly built model")
        state.update(full)
        fresh.load_state_dict(state)
        out = save(fresh, directory, overwrite=True, tokenizer=tokenizer_name)
    barrier()
    return out
