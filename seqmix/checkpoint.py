"""Model directories: config.json + safetensors weights (sharded when large), written atomically; hub names resolved."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Optional, Union

import torch

from seqmix.config import ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"

PathLike = Union[str, Path]


# -- writing ------------------------------------------------------------------------------------------
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: Union[int, str]) -> int:
    """Bytes in `size`: an int, or a string such as "500MB", "5GB" (powers of 1000) or "2GiB" (powers of 1024)."""
    m = _SIZE.fullmatch(size) if isinstance(size, str) else None
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        n = int(Decimal(m[1]) * _UNITS[(m[2] or "b").lower()]) if m else 0
    if n <= 0:
        raise ValueError(f"max_shard_size {size!r} is not a positive size; give bytes as an int (500_000_000) "
                         f"or a string such as '500MB', '5GB' or '2GiB'")
    return n


# safetensors header: 8-byte length, then JSON {"__metadata__": {...}, name: {dtype, shape, data_offsets}, ...}
# padded with spaces to a multiple of 8. Python's ASCII-escaped JSON is never shorter than the file's UTF-8 JSON,
# and "F8_E4M3" is the longest dtype name, so these bound the header from above.
_HEADER_FIXED = 8 + 7 + len(json.dumps({"__metadata__": {"format": "pt"}}, separators=(",", ":")))


def _header_bound(name: str, t: torch.Tensor, limit: int) -> int:
    """Bytes `name` adds to a shard's header at most (its data offsets are <= limit unless it sits alone)."""
    entry = {name: {"dtype": "F8_E4M3", "shape": list(t.shape), "data_offsets": [limit, limit + t.nbytes]}}
    return len(json.dumps(entry, separators=(",", ":"))) + 1  # + the separating comma


def plan_shards(state: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Split `state`'s keys, in order, into shards whose safetensors files stay within `limit` bytes: a shard is
    closed when the next tensor would overflow it; a tensor larger than `limit` on its own gets its own shard."""
    shards: list[list[str]] = [[]]
    used = _HEADER_FIXED
    for name, t in state.items():
        cost = t.nbytes + _header_bound(name, t, limit)
        if shards[-1] and used + cost > limit:
            shards.append([])
            used = _HEADER_FIXED
        shards[-1].append(name)
        used += cost
    return shards


def save_pretrained(model, directory: PathLike, *, max_shard_size: Union[int, str] = "5GB") -> Path:
    """Write `model` (a HybridLM) to `directory`: config.json and model.safetensors, or, when the weights exceed
    `max_shard_size` (bytes per file), model-0000i-of-0000N.safetensors + model.safetensors.index.json in the
    Hugging Face layout. The files appear all at once: they are written into a temporary sibling folder which then
    replaces `directory`, so a crash never leaves a half-written model."""
    from safetensors.torch import save_file

    from seqmix import __version__

    limit = parse_size(max_shard_size)
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # A tied head is `lm_head = None`, so the state dict holds no alias and every tensor is stored once.
    state = {k: v.detach() for k, v in model.state_dict().items()}
    shards = plan_shards(state, limit)
    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        cfg = {"model_type": "seqmix", "seqmix_version": __version__, **model.config.to_dict()}
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        for keys, fname in zip(shards, names):  # one shard at a time in host memory
            save_file({k: state[k].contiguous().cpu() for k in keys}, str(tmp / fname), metadata={"format": "pt"})
        if n > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())},
                     "weight_map": {k: fname for keys, fname in zip(shards, names) for k in keys}}
            (tmp / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
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


# -- reading ------------------------------------------------------------------------------------------
def read_weights(directory: PathLike, *, device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor stored in `directory`, by the first of: model.safetensors, model.safetensors.index.json
    (shards), pytorch_model.bin, pytorch_model.bin.index.json (shards). `.bin` files are read with
    `torch.load(weights_only=True)`, so no pickled code runs; a single .bin comes back as saved (a Lightning
    checkpoint nests its tensors under "state_dict"; the caller unwraps)."""
    from safetensors.torch import load_file

    path = Path(directory)

    def load_st(f: Path) -> dict:
        return load_file(str(f), device=str(device))

    def load_bin(f: Path) -> dict:
        out = torch.load(str(f), map_location=device, weights_only=True)
        if not isinstance(out, dict):
            raise ValueError(f"{f} holds a {type(out).__name__}, not a dict of tensors")
        return out

    for single, index, load in ((WEIGHTS_NAME, WEIGHTS_INDEX_NAME, load_st), (BIN_NAME, BIN_INDEX_NAME, load_bin)):
        if (path / single).is_file():
            return dict(load(path / single))
        if (path / index).is_file():
            weight_map = json.loads((path / index).read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{path / index} has no weight_map {{tensor name: shard file}}")
            shards = sorted(set(weight_map.values()))
            if lost := [s for s in shards if not (path / s).is_file()]:
                raise FileNotFoundError(f"{path} lacks shard(s) {lost} listed in {index}; the download or copy "
                                        f"is incomplete")
            out: dict[str, torch.Tensor] = {}
            for shard in shards:
                out.update(load(path / shard))
            if absent := sorted(k for k in weight_map if k not in out):
                raise ValueError(f"{index} lists tensors its shards do not hold: {absent[:5]}"
                                 f"{' ...' if len(absent) > 5 else ''}")
            return out
    raise FileNotFoundError(f"{path} holds no {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME}, {BIN_NAME} or {BIN_INDEX_NAME}")


def load_config(directory: PathLike) -> ModelConfig:
    """The ModelConfig in a seqmix model directory's config.json."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a seqmix model directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    return ModelConfig.from_dict(json.loads(path.read_text()))


# -- hub names ----------------------------------------------------------------------------------------
_REPO_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]*[A-Za-z0-9_]")
_SAFETENSORS_FILES = [CONFIG_NAME, "tokenizer_config.json", WEIGHTS_NAME, "model-*.safetensors", WEIGHTS_INDEX_NAME]
_BIN_FILES = [CONFIG_NAME, "tokenizer_config.json", BIN_NAME, "pytorch_model-*.bin", BIN_INDEX_NAME]


def resolve_model_dir(name_or_path: PathLike, *, revision: Optional[str] = None, cache_dir: Optional[PathLike] = None,
                      local_files_only: bool = False) -> Path:
    """The local directory of a model: an existing directory as is (it wins over a hub repo of the same name),
    else the Hugging Face hub repo "org/name" downloaded into (or found in) the hub cache by huggingface_hub's
    `snapshot_download`. Only config.json and the weights are fetched: safetensors when the repo has them, else
    pytorch_model*.bin. A `Path` is always a local path. Errors (FileNotFoundError, PermissionError for gated
    repos, ImportError without huggingface_hub) name the repo and say what to do."""
    path = Path(name_or_path)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub names, but {str(path)!r} is a local directory")
        return path
    name = str(name_or_path)
    if path.exists():
        raise NotADirectoryError(f"{name} is a file; pass the model directory that holds {CONFIG_NAME}")
    if isinstance(name_or_path, Path) or not _REPO_ID.fullmatch(name) or ".." in name or "--" in name:
        raise FileNotFoundError(f"no directory {name!r}; pass an existing model directory or a Hugging Face hub "
                                f"name of the form 'org/name' (e.g. 'hazyresearch/based-360m')")
    snapshot = _snapshot(name, _SAFETENSORS_FILES, revision, cache_dir, local_files_only)
    if not any(snapshot.glob("*.safetensors")) and not (snapshot / WEIGHTS_INDEX_NAME).is_file():
        snapshot = _snapshot(name, _BIN_FILES, revision, cache_dir, local_files_only)
    return snapshot


def _snapshot(repo_id: str, patterns: list[str], revision: Optional[str], cache_dir: Optional[PathLike],
              local_files_only: bool) -> Path:
    """snapshot_download, its errors turned into messages that say what to do."""
    try:
        from huggingface_hub import errors as hf, snapshot_download
    except ImportError as e:
        raise ImportError(f"{repo_id!r} is not a local directory, and downloading it from the Hugging Face hub "
                          f"needs huggingface_hub: pip install huggingface_hub") from e
    rev = f" (revision {revision!r})" if revision else ""
    local_hint = "or pass a local directory holding config.json and the weights"
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      local_files_only=local_files_only, allow_patterns=patterns))
    except hf.GatedRepoError as e:
        raise PermissionError(f"{repo_id} is a gated repository: accept its terms at https://huggingface.co/"
                              f"{repo_id} and log in (`hf auth login`), {local_hint}") from e
    except hf.RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{repo_id!r} is neither a local directory nor a model repository on the Hugging "
                                f"Face hub (a private one needs `hf auth login`); check the name, {local_hint}") from e
    except hf.RevisionNotFoundError as e:
        raise FileNotFoundError(f"{repo_id} has no revision {revision!r}; pass an existing branch, tag or "
                                f"commit") from e
    except hf.LocalEntryNotFoundError as e:  # not (completely) in the cache, and no download possible
        why = ("local_files_only=True forbids downloading it" if local_files_only
               else "the hub cannot be reached (no network, or huggingface_hub's offline mode)")
        where = f"cache {cache_dir}" if cache_dir is not None else "default cache"
        raise FileNotFoundError(f"{repo_id}{rev} is not in the Hugging Face {where} and {why}; download it once "
                                f"with network access (local_files_only=False), {local_hint}.\n({e})") from e
    except hf.HFValidationError as e:
        raise ValueError(f"{repo_id!r} is not a valid Hugging Face hub name: {e}") from e
    except hf.HfHubHTTPError as e:
        raise OSError(f"downloading {repo_id}{rev} from the Hugging Face hub failed: {e}\nRetry, pass "
                      f"local_files_only=True to use a cached copy, {local_hint}") from e


# -- loading ------------------------------------------------------------------------------------------
def from_pretrained(name_or_path: PathLike, *, device: Union[str, torch.device] = "cpu", dtype=None, registry=None,
                    revision: Optional[str] = None, cache_dir: Optional[PathLike] = None,
                    local_files_only: bool = False):
    """A HybridLM from a model directory or a hub name "org/name" (see resolve_model_dir).

    A seqmix directory (config.json with model_type "seqmix") is loaded as saved, single-file or sharded; a key
    or shape mismatch names the keys. Anything else (a Based-repo checkpoint, transformers Llama or Mamba) is
    imported by seqmix.convert.convert_checkpoint. The model is then cast to `dtype` and moved to `device`."""
    directory = resolve_model_dir(name_or_path, revision=revision, cache_dir=cache_dir,
                                  local_files_only=local_files_only)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: a model directory holds {CONFIG_NAME} and its weights")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") != "seqmix":
        from seqmix.convert import convert_checkpoint

        return convert_checkpoint(directory, registry=registry).to(device=device, dtype=dtype)
    model = _load_native(directory, ModelConfig.from_dict(cfg), device, registry)
    return model.to(dtype) if dtype is not None else model


def _load_native(directory: Path, config: ModelConfig, device, registry):
    from seqmix.model import build_model

    model = build_model(config, device=device, registry=registry)
    tensors = read_weights(directory, device=device)
    if tensors and all(k.startswith("model.") for k in tensors):  # written by a wrapper holding it as `.model`
        tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
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
    return model
