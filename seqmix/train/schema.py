"""The training recipe: typed dataclasses, loaded from one flat YAML file plus dotlist overrides via omegaconf.

    recipe = load_recipe("recipes/tiny.yaml", ["train.steps=100", "zero.stage=3"])

A misspelt key or a value of the wrong type is a `RecipeError` that names the key (`train.stpes`); values that
type-check but make no sense (a ZeRO stage of 5, a learning rate floor above the peak) are caught by `validate`.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

DTYPES = ("bf16", "fp16", "fp32")
SOURCES = ("embedded", "files", "hf", "synthetic")
SCHEDULES = ("cosine", "constant")
OFFLOAD = ("none", "cpu", "nvme")


class RecipeError(ValueError):
    """A recipe that does not load or validate; the message names the offending key."""


@dataclass
class ModelSection:
    """The architecture: a named one (`arch: based-360m`) or a spec string with sizes."""

    arch: Optional[str] = None  # a name from seqmix.config.NAMED_ARCHS
    spec: Optional[str] = None  # a spec string, e.g. "conv,mlp,based,mlp,swa:64,mlp"
    layers: Optional[int] = None  # tile the spec to this many blocks
    d_model: Optional[int] = None  # default: the named architecture's, else 1024
    n_heads: Optional[int] = None
    vocab_size: Optional[int] = None  # default: the tokenizer's
    max_seqlen: Optional[int] = None  # default: data.seq_len


@dataclass
class TrainSection:
    steps: int = 20_000  # optimizer steps
    global_batch: int = 256  # sequences per optimizer step, summed over ranks and micro-batches
    micro_batch: int = 8  # sequences per rank per forward/backward; accumulation = global / (micro * world)
    dtype: str = "bf16"  # bf16 | fp16 | fp32 (weights and activations; the optimizer keeps fp32 masters)
    compile: Optional[bool] = None  # torch.compile each block (None: on for CUDA with zero.stage < 3, off on CPU)
    seed: int = 0  # model init and data order
    eval_every: int = 1000  # steps between evaluations on the held-out split (0 = never)
    eval_batches: int = 10  # global batches of held-out sequences per evaluation (capped at the split)
    save_every: int = 1000  # steps between checkpoints (the last step is always saved)
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    run_dir: str = "runs/${name}"  # checkpoints, metrics.jsonl, recipe.yaml, ds_config.json, model/
    export_dir: Optional[str] = None  # the final model directory; default <run_dir>/model


@dataclass
class OptimSection:
    """AdamW with linear warmup then cosine decay; no weight decay on norms, biases and embeddings."""

    lr: float = 8e-4
    min_lr: float = 8e-5  # the cosine ends here at train.steps
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 200
    schedule: str = "cosine"  # cosine | constant (after warmup)
    grad_clip: float = 1.0  # global gradient norm; 0 = off


@dataclass
class DataSection:
    """Where the text comes from and how it is cut: packed windows of seq_len + 1 tokens, EOS between documents."""

    source: str = "embedded"  # embedded (shipped Shakespeare) | files | hf (Hugging Face datasets) | synthetic
    tokenizer: str = "gpt2"  # gpt2 | bytes
    seq_len: int = 2048
    files: list[str] = field(default_factory=list)  # source=files: globs of .txt (one document each) / .jsonl
    hf_path: Optional[str] = None  # source=hf: datasets.load_dataset(hf_path, hf_name, split=hf_split)
    hf_name: Optional[str] = None
    hf_split: str = "train"
    hf_val_split: Optional[str] = None  # held-out split of the dataset; default: the tail of the training text
    hf_streaming: bool = False  # stream rows instead of downloading the whole dataset first
    text_field: str = "text"  # the text column of .jsonl rows and datasets
    doc_regex: Optional[str] = None  # a line/row matching it starts a new document (else a file/row is one)
    max_tokens: Optional[int] = None  # stop tokenising after this many tokens (the held-out tail included)
    val_fraction: float = 0.02  # tail of the token stream held out for evaluation (unless hf_val_split)
    cache_dir: str = "runs/data"  # tokenised shards, keyed by a fingerprint of the source and tokenizer
    shard_tokens: int = 1 << 28  # tokens per shard file


@dataclass
class ZeroSection:
    stage: int = 1  # 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_param: str = "none"  # none | cpu | nvme (stage 3 only)
    nvme_path: Optional[str] = None
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    bucket_size: int = 500_000_000  # elements per reduce / all-gather bucket


@dataclass
class LogSection:
    every: int = 10  # steps between console lines (metrics.jsonl gets every step)
    progress: bool = True  # rich progress bar on rank 0
    tensorboard: bool = True  # write <run_dir>/tensorboard when the tensorboard package is installed
    peak_tflops: Optional[float] = None  # per-device peak for MFU; default: looked up from the GPU name


@dataclass
class Recipe:
    name: str = "recipe"  # default: the YAML file's stem
    description: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    zero: ZeroSection = field(default_factory=ZeroSection)
    log: LogSection = field(default_factory=LogSection)


# -- loading ----------------------------------------------------------------------------------------------
def find_recipe(name_or_path: Union[str, Path], search_dirs: Sequence[Union[str, Path]] = ()) -> Path:
    """`tiny` -> <dir>/tiny.yaml for the first search dir that has it; a path to a YAML file is returned as is."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise RecipeError(f"recipe file {p} not found")
        return p
    for d in search_dirs:
        cand = Path(d) / f"{name_or_path}.yaml"
        if cand.is_file():
            return cand
    known = sorted({f.stem for d in search_dirs for f in Path(d).glob("*.yaml")})
    close = difflib.get_close_matches(str(name_or_path), known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RecipeError(f"no recipe named {str(name_or_path)!r}.{hint} Known recipes: {', '.join(known) or 'none'}")


def load_recipe(path: Union[str, Path], overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe YAML, apply dotlist overrides (`train.steps=100`), type-check, resolve and validate it."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    base = OmegaConf.structured(Recipe)
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors come from yaml, not omegaconf
        raise RecipeError(f"{path}: not a valid YAML file: {e}") from None
    if not isinstance(raw, DictConfig):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model, train, optim, data, zero, log)")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise RecipeError(f"override {bad[0]!r} is not of the form key=value (e.g. train.steps=100)")
    stage = f"{path}"
    try:
        cfg = OmegaConf.merge(base, raw)
        if "name" not in raw:
            cfg.name = path.stem
        stage = "the command-line overrides"
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        stage = f"{path} (resolving ${{...}} references)"
        recipe = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise RecipeError(f"{stage}: {_describe(e)}") from None
    validate(recipe)
    return recipe


def _describe(e) -> str:
    """One line from an omegaconf error: the full key and what was wrong with it (with its 'Did you mean')."""
    msg = str(getattr(e, "msg", None) or e).split("\n")[0]
    key = getattr(e, "full_key", None)
    return f"{key}: {msg}" if key else msg


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what a run directory records for provenance)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


# -- validation -------------------------------------------------------------------------------------------
def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise RecipeError(f"{key}: {message}")


def _choice(value: str, key: str, choices: Sequence[str]) -> None:
    _require(value in choices, key, f"must be one of {', '.join(choices)}; got {value!r}")


def validate(r: Recipe) -> None:
    """Check what types cannot: ranges, choices and combinations. Raises RecipeError naming the key."""
    from seqmix.config import NAMED_ARCHS
    from seqmix.tokenizer import NAMES

    m, t, o, d, z, lg = r.model, r.train, r.optim, r.data, r.zero, r.log
    for name, section in (("model", m), ("train", t), ("optim", o), ("data", d), ("zero", z), ("log", lg)):
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            _require(not isinstance(v, int) or isinstance(v, bool) or -(1 << 63) <= v < (1 << 63),
                     f"{name}.{f.name}", f"{v} does not fit in a 64-bit integer")
    _require((m.arch is None) != (m.spec is None), "model",
             "give exactly one of model.arch (a named architecture) or model.spec (a spec string)")
    if m.arch is not None:
        _require(m.arch in NAMED_ARCHS, "model.arch",
                 f"unknown architecture {m.arch!r}; named architectures: {', '.join(sorted(NAMED_ARCHS))} "
                 "(or give a spec string as model.spec)")
    for key in ("layers", "d_model", "n_heads", "vocab_size", "max_seqlen"):
        v = getattr(m, key)
        _require(v is None or v > 0, f"model.{key}", f"must be positive, got {v}")
    for key in ("steps", "global_batch", "micro_batch", "save_every", "keep_checkpoints"):
        _require(getattr(t, key) > 0, f"train.{key}", f"must be positive, got {getattr(t, key)}")
    _require(t.eval_every >= 0, "train.eval_every", f"must be >= 0 (0 = never), got {t.eval_every}")
    _require(t.eval_batches > 0, "train.eval_batches", f"must be positive, got {t.eval_batches}")
    _require(t.global_batch % t.micro_batch == 0, "train.global_batch",
             f"{t.global_batch} is not a multiple of train.micro_batch={t.micro_batch}")
    _choice(t.dtype, "train.dtype", DTYPES)
    _require(not (t.compile and z.stage == 3), "train.compile",
             "torch.compile of the blocks is not supported with zero.stage=3 (its parameter hooks break the graphs); "
             "set train.compile=false or use zero.stage <= 2")
    _require(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _require(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
             f"must be two numbers in [0, 1), got {list(o.betas)}")
    _require(o.eps > 0, "optim.eps", f"must be positive, got {o.eps}")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _require(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 = off), got {o.grad_clip}")
    _choice(o.schedule, "optim.schedule", SCHEDULES)
    _choice(d.source, "data.source", SOURCES)
    _choice(d.tokenizer, "data.tokenizer", NAMES)
    _require(d.seq_len > 0, "data.seq_len", f"must be positive, got {d.seq_len}")
    _require(0 <= d.val_fraction < 1, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    _require(d.shard_tokens > d.seq_len, "data.shard_tokens", f"must exceed data.seq_len={d.seq_len}")
    _require(d.max_tokens is None or d.max_tokens > d.seq_len, "data.max_tokens",
             f"must exceed data.seq_len={d.seq_len}, got {d.max_tokens}")
    _require(d.source != "files" or bool(d.files), "data.files", "data.source=files needs at least one path or glob")
    _require(d.source != "hf" or bool(d.hf_path), "data.hf_path",
             "data.source=hf needs a dataset path (e.g. Salesforce/wikitext)")
    if d.doc_regex is not None:
        import re

        try:
            re.compile(d.doc_regex)
        except re.error as e:
            raise RecipeError(f"data.doc_regex: not a valid regular expression: {e}") from None
    _require(0 <= z.stage <= 3, "zero.stage", f"must be 0, 1, 2 or 3, got {z.stage}")
    _choice(z.offload_optimizer, "zero.offload_optimizer", OFFLOAD)
    _choice(z.offload_param, "zero.offload_param", OFFLOAD)
    _require(z.offload_param == "none" or z.stage == 3, "zero.offload_param", "parameter offload needs zero.stage=3")
    _require(z.offload_optimizer == "none" or z.stage >= 1, "zero.offload_optimizer",
             "optimizer offload needs zero.stage >= 1")
    _require("nvme" not in (z.offload_optimizer, z.offload_param) or bool(z.nvme_path), "zero.nvme_path",
             "NVMe offload needs zero.nvme_path")
    _require(z.bucket_size > 0, "zero.bucket_size", f"must be positive, got {z.bucket_size}")
    _require(lg.every > 0, "log.every", f"must be positive, got {lg.every}")
    _require(lg.peak_tflops is None or lg.peak_tflops > 0, "log.peak_tflops", f"must be positive, got {lg.peak_tflops}")


def grad_accum_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-batches per rank per optimizer step, so that micro_batch * world_size * accum == global_batch."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        fits = [m for m in range(1, global_batch + 1) if global_batch % (m * world_size) == 0]
        fix = (f"with {world_size} ranks use train.micro_batch in {fits}" if fits else
               f"make train.global_batch a multiple of the world size {world_size}")
        raise RecipeError(
            f"train.global_batch={global_batch} is not divisible by train.micro_batch={micro_batch} x "
            f"world size {world_size} = {per_step}, so no whole number of gradient-accumulation steps fits; {fix}"
        )
    return global_batch // per_step
