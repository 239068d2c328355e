"""The training loop: DeepSpeed engine around a HybridLM, deterministic batches, eval, checkpoints, export.

    from seqmix.train import load_recipe, train
    result = train(load_recipe("recipes/tiny.yaml", ["train.steps=50"]))

Run under any launcher (`deepspeed`, `torchrun`) or none: a plain `python` start is a world of one (the
process-group variables are filled in by seqmix.train.dist). `train` is the loop; `setup_run` builds what
it needs (engine, data, resumed state); `train_step` is one optimizer step: `accum` micro-batches of forward +
backward, the mean loss all-reduced and checked (NaN/inf stops the run before the optimizer step, naming the
step; the last good checkpoint stays), then the optimizer step, whose gradient norm is checked the same way (not
under fp16, whose loss scaler skips overflowing steps itself). Logs go to the console (rank 0), <run_dir>/metrics.jsonl
(one JSON object per step and per evaluation) and TensorBoard when installed.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from seqmix.config import ModelConfig, resolve_model
from seqmix.train import ckpt
from seqmix.train.data import (PackedTokens, StepSampler, SyntheticTokens, get_batch, prepare_data,
                               training_split)
from seqmix.train.dist import all_reduce_sum, barrier, init_distributed
from seqmix.train.guards import check_grad_norm, check_reshardable, check_resumable, diverged
from seqmix.train.ds_config import build_ds_config
from seqmix.train.runlock import RunDirLock
from seqmix.train.schema import OptimSection, Recipe, RecipeError, recipe_to_dict, recipe_to_yaml

# Dense bf16/fp16 tensor-core peak per device (FLOP/s), matched against the device name, for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A6000": 155e12, "4090": 165e12}
# Recipe keys a resumed run must share with the checkpoint it resumes.


@dataclass
class RunResult:
    run_dir: Path
    start_step: int  # steps already done when this run started (0, or the resumed checkpoint's)
    step: int  # steps done when it stopped
    losses: list[float] = field(default_factory=list)  # training loss of each step this run took
    eval_losses: dict[int, float] = field(default_factory=dict)
    export_dir: Optional[Path] = None
    seconds: float = 0.0


# -- model and optimizer ----------------------------------------------------------------------------------
def model_config(recipe: Recipe, vocab_size: int) -> ModelConfig:
    m = recipe.model
    return resolve_model(m.arch or m.spec, layers=m.layers, d_model=m.d_model, n_heads=m.n_heads,
                         vocab_size=m.vocab_size or vocab_size, max_seqlen=m.max_seqlen or recipe.data.seq_len)


class LMLoss(nn.Module):
    """What the DeepSpeed engine runs: next-token cross-entropy of the wrapped HybridLM."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        return self.lm.loss(tokens_BT, targets_BT)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: no weight decay on norms, biases, embeddings (and the tied head) or on parameters
    a mixer marks with `_no_weight_decay` (Mamba's A_log and D)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        skip = p.dim() < 2 or id(p) in embeddings or getattr(p, "_no_weight_decay", False)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_multiplier(step: int, optim: OptimSection, total_steps: int) -> float:
    """Factor on optim.lr for the optimizer step `step` (0-based): linear warmup over warmup_steps, then
    cosine (or constant) down to min_lr at total_steps."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    floor = optim.min_lr / optim.lr
    if optim.schedule == "constant":
        return 1.0
    span = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(recipe: Recipe, groups: list[dict], device_type: str) -> torch.optim.Optimizer:
    o = recipe.optim
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if recipe.zero.offload_optimizer != "none":  # ZeRO-Offload steps on the CPU with DeepSpeed's own Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, fused=device_type == "cuda", **kw)


def peak_flops(device: torch.device, dtype: str, override_tflops: Optional[float]) -> Optional[float]:
    """Peak FLOP/s of one device for MFU: log.peak_tflops if given, else the table for bf16/fp16 on known GPUs."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda" or dtype == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def compiles(recipe: Recipe, device_type: str) -> bool:
    """train.compile, resolved: given, or on for CUDA unless ZeRO-3 (whose parameter hooks break the graphs)."""
    if recipe.train.compile is not None:
        return recipe.train.compile
    return device_type == "cuda" and recipe.zero.stage < 3


@dataclass
class Built:
    engine: object  # deepspeed.DeepSpeedEngine around LMLoss(lm)
    lm: nn.Module  # the HybridLM (under ZeRO-3 its parameters are partitioned: count them from here)
    ds_config: dict
    num_params: int
    flops_per_token: int  # forward FLOPs per token at data.seq_len


def build_engine(recipe: Recipe, vocab_size: int, world: int, device_type: str, load_universal: bool = False) -> Built:
    """The seeded HybridLM, wrapped for the loss, with AdamW groups and the LR schedule, inside a DeepSpeed
    engine; every rank builds the same initial weights."""
    import deepspeed

    from seqmix.model import build_model

    ds_config = build_ds_config(recipe, world)
    if load_universal:  # resuming a checkpoint another world size wrote (seqmix.train.ckpt.prepare_resume)
        ds_config["checkpoint"] = {"load_universal": True}
    torch.manual_seed(recipe.train.seed)
    lm = build_model(model_config(recipe, vocab_size))
    num_params, flops = lm.num_params(), lm.flops_per_token(recipe.data.seq_len)  # before ZeRO-3 partitions
    if compiles(recipe, device_type):
        lm.compile_blocks()  # lazy: each block compiles at its first call, after DeepSpeed has placed it
    if recipe.zero.stage == 3 and lm.lm_head is None:  # the tied head reads embed.weight outside embed's forward
        deepspeed.zero.register_external_parameter(lm, lm.embed.weight)
    module = LMLoss(lm)
    optimizer = make_optimizer(recipe, param_groups(module, recipe.optim.weight_decay), device_type)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_multiplier, optim=recipe.optim, total_steps=recipe.train.steps))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return Built(engine, lm, ds_config, num_params, flops)


# -- the run ----------------------------------------------------------------------------------------------
def _datasets(recipe: Recipe, vocab_size: int, local_rank: int, say):
    d = recipe.data
    if d.source == "synthetic":
        return (SyntheticTokens(d.seq_len, vocab_size, recipe.train.seed),
                SyntheticTokens(d.seq_len, vocab_size, recipe.train.seed + 1))
    if local_rank == 0:
        prepare_data(d, log=say)
    barrier()
    shard_dir = prepare_data(d)  # found in the cache now
    return training_split(shard_dir, d.seq_len), PackedTokens(shard_dir, "val", d.seq_len)


@dataclass
class Run:
    """Everything one training run holds between steps (built by setup_run)."""
    recipe: Recipe
    rank: int
    world: int
    say: object  # print on rank 0, nothing elsewhere
    device: torch.device
    built: Built
    accum: int  # micro-batches per optimizer step
    train_ds: object
    val_ds: object
    ckpt_dir: Path
    start: int  # steps done before this run (0, or the resumed checkpoint's)
    sampler: StepSampler
    metrics: Optional["_MetricsLog"]  # rank 0 only
    peak: Optional[float]  # FLOP/s of one device, for MFU
    manual_norm: bool  # DeepSpeed reports no grad norm (ZeRO 0 in fp32): compute it here
    lock: Optional[RunDirLock]  # rank 0 holds <run_dir>/.lock for the run


def setup_run(recipe: Recipe, console) -> Run:
    """Start the process group, build the engine and the data, resume from the last checkpoint if any, and
    (rank 0) write the run's recipe.yaml and ds_config.json and print the run's summary line."""
    from deepspeed.accelerator import get_accelerator

    from seqmix.spec import format_spec
    from seqmix.tokenizer import tokenizer_vocab_size

    preflight(recipe)  # a bad spec or head count is a RecipeError before DeepSpeed starts
    rank, world, local_rank = init_distributed()
    is0 = rank == 0
    say = partial(console.print, markup=False, highlight=False) if is0 else (lambda *a, **k: None)
    run_lock = RunDirLock(recipe.train.run_dir) if is0 else None  # one run per run_dir; RunDirBusy if taken
    if run_lock is not None and run_lock.previous:
        say(f"{run_lock.path}: took over from a run that ended without releasing it ({run_lock.previous})")
    device = torch.device(get_accelerator().device_name(local_rank))
    t, d = recipe.train, recipe.data
    run_dir = Path(t.run_dir)
    vocab = tokenizer_vocab_size(d.tokenizer)
    ckpt_dir = run_dir / "checkpoints"
    check = partial(check_resumable, recipe=recipe, run_dir=run_dir)  # before DeepSpeed reads anything
    universal = ckpt.prepare_resume(ckpt_dir, world, rank, check=check, check_reshard=partial(
        check_reshardable, recipe=recipe, world=world, run_dir=run_dir))
    # raises on a global batch that won't divide
    built = build_engine(recipe, vocab, world, device.type, load_universal=universal is not None)
    lm, ds_config = built.lm, built.ds_config
    accum = ds_config["gradient_accumulation_steps"]
    torch.manual_seed(t.seed + 1 + rank)  # anything stochastic after init differs per rank, reproducibly
    if lm.config.vocab_size < vocab and d.source != "synthetic":
        raise RecipeError(f"model.vocab_size={lm.config.vocab_size} is smaller than the {d.tokenizer} tokenizer's "
                          f"{vocab} tokens; leave model.vocab_size unset to use the tokenizer's")
    train_ds, val_ds = _datasets(recipe, lm.config.vocab_size, local_rank, say)

    client = ckpt.load_checkpoint(built.engine, ckpt_dir, rank, check=check, universal=universal is not None)
    start = 0
    if client is not None:
        start = int(client["step"])
        say(f"resuming {run_dir} from step {start} ({ckpt_dir / ckpt.tag_for(start)})")
        if universal is not None:
            say(f"  written by {ckpt.saved_world_size(universal.parent)} ranks, continued by {world}: loaded "
                f"through DeepSpeed's universal checkpoint {universal}")
    if is0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        say(f"{recipe.name}: {recipe.model.arch or format_spec(lm.layer_specs, lm.registry, compact=True)}"
            f" | {built.num_params:,} parameters | world {world} x micro {t.micro_batch} x accum {accum} = "
            f"{t.global_batch} seq x {d.seq_len} tokens | ZeRO {recipe.zero.stage} | {t.dtype} on {device.type}"
            f"{' | compiled blocks' if compiles(recipe, device.type) else ''}")

    return Run(
        recipe=recipe, rank=rank, world=world, say=say, device=device, built=built, accum=accum,
        train_ds=train_ds, val_ds=val_ds, ckpt_dir=ckpt_dir, start=start,
        sampler=StepSampler(len(train_ds), global_batch=t.global_batch, micro_batch=t.micro_batch,
                            world_size=world, rank=rank, seed=t.seed),
        metrics=_MetricsLog(run_dir, start, recipe.log.tensorboard) if is0 else None,
        peak=peak_flops(device, t.dtype, recipe.log.peak_tflops),
        manual_norm=recipe.zero.stage == 0 and t.dtype == "fp32", lock=run_lock,
    )


def train_step(run: Run, step: int) -> dict:
    """Optimizer step `step` (0-based): `accum` micro-batches of forward + backward, the mean loss all-reduced
    and checked (NaN/inf raises TrainingDiverged before the optimizer step), then the optimizer step and its
    gradient norm checked (a non-finite norm raises TrainingDiverged before anything is saved). Returns
    the step's metrics record."""
    t, seq_len = run.recipe.train, run.recipe.data.seq_len
    engine = run.built.engine
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(run.accum):
        x, y = get_batch(run.train_ds, run.sampler.indices(step, micro), run.device)
        loss = engine(x, y)
        engine.backward(loss)
        loss_sum += loss.detach().float()
        if micro < run.accum - 1:
            engine.step()  # DeepSpeed only counts the micro-batch here; the optimizer waits
    all_reduce_sum(loss_sum)
    loss_val = loss_sum.item() / (run.accum * run.world)
    if not math.isfinite(loss_val):
        raise diverged(f"the training loss is {loss_val} at step {step + 1}; stopped before the optimizer step",
                        run.ckpt_dir)
    lr = engine.get_lr()[0]
    norm = _grad_norm(engine.module) if run.manual_norm else None
    engine.step()
    norm = norm if run.manual_norm else engine.get_global_grad_norm()
    check_grad_norm(norm, step + 1, t.dtype, run.ckpt_dir)
    done = step + 1
    dt = time.perf_counter() - t0
    tok_s = t.global_batch * seq_len / dt
    fwd_flops = run.built.flops_per_token
    return {"step": done, "loss": loss_val, "lr": lr, "grad_norm": None if norm is None else float(norm),
            "tokens": done * t.global_batch * seq_len, "tokens_per_s": tok_s, "step_s": dt,
            "mfu": tok_s * 3 * fwd_flops / (run.peak * run.world) if run.peak else None}


def train(recipe: Recipe, *, stop_after: Optional[int] = None, console=None) -> RunResult:
    """Train (or resume) `recipe`. `stop_after`: end this run after that step, with a checkpoint, as if
    interrupted there (the schedule still spans train.steps). Call `shutdown()` when done with the process."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    t_start = time.perf_counter()
    console = console or Console(soft_wrap=True)
    run = setup_run(recipe, console)
    t, say, metrics = recipe.train, run.say, run.metrics
    total, run_dir = t.steps, Path(t.run_dir)
    result = RunResult(run_dir=run_dir, start_step=run.start, step=run.start)
    end = min(total, stop_after) if stop_after is not None else total
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[stats]}"), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not (run.rank == 0 and recipe.log.progress)) as bar:
        task = bar.add_task("train", total=total, completed=run.start, stats="")
        run.built.engine.train()
        for step in range(run.start, end):
            rec = train_step(run, step)
            done = rec["step"]
            result.losses.append(rec["loss"])
            result.step = done
            if metrics:
                metrics.write(rec)
                stats = _fmt(rec)
                bar.update(task, completed=done, stats=stats)
                if done % recipe.log.every == 0 or done == end:
                    say(f"step {done:>6}/{total}  {stats}")
            if t.eval_every and (done % t.eval_every == 0 or done == total):
                ev = evaluate(run.built.engine, run.val_ds, recipe, run.world, run.rank, run.device)
                if ev is not None:
                    result.eval_losses[done] = ev
                    if metrics:
                        metrics.write({"step": done, "eval_loss": ev})
                        say(f"step {done:>6}/{total}  eval loss {ev:.4f}")
            if done % t.save_every == 0 or done == end:
                state = {"step": done, "recipe": recipe_to_dict(recipe)}
                path = ckpt.save_checkpoint(run.built.engine, run.ckpt_dir, done, state, t.keep_checkpoints,
                                            run.rank)
                say(f"step {done:>6}/{total}  saved {path}")
    if metrics:
        metrics.close()
    if result.step == total:
        export_dir = Path(t.export_dir or run_dir / "model")
        ckpt.export_model(run.built.lm, recipe.data.tokenizer, export_dir, run.rank)
        result.export_dir = export_dir
        say(f"exported the model to {export_dir} (seqmix generate {export_dir} --prompt ...)")
    result.seconds = time.perf_counter() - t_start
    if run.lock is not None:
        run.lock.release()
    return result


def preflight(recipe: Recipe) -> None:
    """Build the recipe's model on the meta device (nothing allocated) before DeepSpeed starts, so a bad spec,
    a head count that does not divide the width, a kernel that cannot run here or a train.export_dir the export
    would refuse is a RecipeError."""
    from seqmix.model import build_model
    from seqmix.spec import SpecError
    from seqmix.tokenizer import tokenizer_vocab_size

    t = recipe.train
    if why := ckpt.check_export_dir(Path(t.export_dir or Path(t.run_dir) / "model"), Path(t.run_dir)):
        raise RecipeError(why)  # refused now, not after the whole run
    key = "model.arch" if recipe.model.arch else "model.spec"
    try:
        build_model(model_config(recipe, tokenizer_vocab_size(recipe.data.tokenizer)), device="meta")
    except SpecError as e:
        raise RecipeError(f"{key}: {e}") from None
    except (ValueError, KeyError, RuntimeError, OverflowError) as e:  # KeyError: UnknownMixerError
        raise RecipeError(f"model: {e.args[0] if isinstance(e, KeyError) and e.args else e}") from None


@torch.no_grad()
def evaluate(engine, dataset, recipe: Recipe, world: int, rank: int, device) -> Optional[float]:
    """Mean loss over the first eval_batches x global_batch held-out samples, in order (whole global batches
    of them if the split is smaller): the same samples for any world size and micro batch; None if too few."""
    t = recipe.train
    per = t.micro_batch * world
    n = min(t.eval_batches, len(dataset) // t.global_batch) * t.global_batch // per
    if n == 0:
        return None
    engine.eval()
    total = torch.zeros((), device=device)
    for k in range(n):
        x, y = get_batch(dataset, np.arange(k * per + rank * t.micro_batch, k * per + (rank + 1) * t.micro_batch),
                         device)
        total += engine(x, y).float()
    engine.train()
    all_reduce_sum(total)
    return total.item() / (n * world)


def _grad_norm(module: nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) \
        if grads else 0.0


def _fmt(rec: dict) -> str:
    parts = [f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}"]
    if rec["grad_norm"] is not None:
        parts.append(f"grad {rec['grad_norm']:.3f}")
    parts.append(f"{rec['tokens_per_s']:,.0f} tok/s")
    if rec["mfu"] is not None:
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    return "  ".join(parts)


class _MetricsLog:
    """metrics.jsonl (records after a resumed step are dropped, so the file is one continuous curve) and
    TensorBoard scalars when the tensorboard package is installed."""

    def __init__(self, run_dir: Path, start_step: int, tensorboard: bool):
        path = run_dir / "metrics.jsonl"
        kept = []
        if start_step and path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
        path.write_text("".join(line + "\n" for line in kept))
        self._f = open(path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                pass

    def write(self, rec: dict) -> None:
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and v is not None:
                    self._tb.add_scalar(f"train/{k}" if k != "eval_loss" else "eval/loss", v, rec["step"])

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()
