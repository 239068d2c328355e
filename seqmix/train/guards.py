"""Stops and refusals of a training run: a different run's checkpoint, a diverged loss or gradient norm."""
from __future__ import annotations

import math
from pathlib import Path

from seqmix.train import ckpt
from seqmix.train.schema import Recipe, RecipeError, recipe_to_dict

RESUME_KEYS = ("model", "data.tokenizer", "data.seq_len", "data.source", "train.global_batch", "train.seed")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the message names the step and the last good
    checkpoint."""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resumable(saved: dict, recipe: Recipe, run_dir: Path) -> None:
    now, before = _flat(recipe_to_dict(recipe)), _flat(saved)
    diff = [f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in sorted(now)
            if any(k == p or k.startswith(p + ".") for p in RESUME_KEYS) and before.get(k) != now[k]]
    if diff:
        raise RecipeError(f"{run_dir} holds a checkpoint of a different run ({'; '.join(diff)}); "
                          "give this run its own train.run_dir, or delete the old one")


def check_reshardable(saved: dict, saved_world: int, recipe: Recipe, world: int, run_dir: Path) -> None:
    """A checkpoint continues on another world size under ZeRO 0-2 (seqmix.train.ckpt.prepare_resume); ZeRO-3 is
    refused: through DeepSpeed's universal checkpoint its optimizer state does not come back exactly (a CPU run
    2 -> 1 drifted 1e-3 from the uninterrupted curve after one step, where ZeRO-1 stays within 2e-7)."""
    stages = {saved.get("zero", {}).get("stage"), recipe.zero.stage}
    if 3 in stages:
        raise RecipeError(
            f"{run_dir}: its last checkpoint was written by {saved_world} ranks and this run has {world}; a ZeRO-3 "
            f"run cannot change its world size on resume (DeepSpeed's universal checkpoint does not restore ZeRO-3's "
            f"optimizer state exactly). Resume it on {saved_world} ranks")


def diverged(what: str, ckpt_dir: Path) -> TrainingDiverged:
    last = ckpt.latest_tag(ckpt_dir)
    return TrainingDiverged(
        f"{what}. " + (f"The last good checkpoint is {ckpt_dir / last} (step {int(last[4:])}); " if last else
                       "No checkpoint was written yet; ")
        + "lower optim.lr or raise optim.warmup_steps, then rerun")


def check_grad_norm(norm, step: int, dtype: str, ckpt_dir: Path) -> None:
    """A NaN/inf gradient norm stops the run (the step is not saved or exported). Not under fp16, where DeepSpeed's
    loss scaler expects overflowing steps: it skips them and lowers the scale (a NaN loss still stops the run)."""
    if norm is None or dtype == "fp16":
        return
    value = float(norm)
    if not math.isfinite(value):
        raise diverged(f"the gradient norm is {value} at step {step}; stopped without saving or exporting that "
                        "step", ckpt_dir)
