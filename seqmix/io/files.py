"""Checkpoint files: safetensors / .bin weights read (single or sharded; every file checked to lie inside the model
folder, every failure a CheckpointFileError naming the file), shards planned and written. Knows file layouts
only, no model; publishing a finished folder is seqmix.io.publish."""
from __future__ import annotations

import json
import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Union

import torch

from seqmix.io.strict import CheckpointFileError

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


def write_weights(state: dict[str, torch.Tensor], directory: Path, max_shard_size: Union[int, str] = "5GB"
                  ) -> list[str]:
    """Write `state` into the existing folder `directory`: model.safetensors, or, when the tensors exceed
    `max_shard_size` (bytes per file, see parse_size), model-0000i-of-0000N.safetensors +
    model.safetensors.index.json in the Hugging Face layout, one shard at a time in host memory, each file with
    the folder's read/write bits (the umask's mode in a new folder). Returns the file names written."""
    from safetensors.torch import save_file

    shards = plan_shards(state, parse_size(max_shard_size))
    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    mode = directory.stat().st_mode & 0o666  # a new folder's mode is the umask's; safetensors writes 0600
    for keys, fname in zip(shards, names):
        try:
            save_file({k: state[k].contiguous().cpu() for k in keys}, str(directory / fname),
                      metadata={"format": "pt"})
        except OSError as e:  # a full disk: say which file did not fit
            raise OSError(e.errno, e.strerror or str(e), fname) from e
        os.chmod(directory / fname, mode)
    if n > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())},
                 "weight_map": {k: fname for keys, fname in zip(shards, names) for k in keys}}
        (directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        names.append(WEIGHTS_INDEX_NAME)
    return names


# -- reading ------------------------------------------------------------------------------------------
def inside(directory: Path, name: str, what: str) -> Path:
    """`directory / name`, refused (CheckpointFileError) unless `name` is a relative path without `..` whose
    file, links followed, lies inside `directory`; in a Hugging Face cache snapshot (<repo>/snapshots/<rev>/)
    the links into the repo's own blobs/ are allowed too."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointFileError(f"{what} names the file {name!r}, which is not a file name inside {directory}; "
                                  "seqmix reads only files inside the model folder: the checkpoint is damaged or "
                                  "hostile, fix or remove that entry")
    path = directory / name
    real, root = path.resolve(), directory.resolve()
    roots = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(real == r or r in real.parents for r in roots):
        raise CheckpointFileError(f"{path} links to {real}, outside the model folder {directory}; seqmix reads only "
                                  "files inside it: copy the file in, or remove the link")
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _load_st(f: Path, device) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(f), device=str(device))
    except MemoryError:
        raise
    except OSError as e:
        raise CheckpointFileError(f"{f} could not be read: {e.strerror or e}") from e
    except Exception as e:  # safetensors' SafetensorError: a truncated file, a bad header, not safetensors at all
        raise CheckpointFileError(f"{f} is not a readable safetensors file ({_first_line(e)}): it is truncated or "
                                  "damaged (an interrupted download, copy or save?); fetch or save it again") from e


def _load_bin(f: Path, device) -> dict:
    import pickle

    try:
        out = torch.load(str(f), map_location=device, weights_only=True)
    except MemoryError:
        raise
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise CheckpointFileError(f"{f} is not a readable PyTorch checkpoint ({_first_line(e)}): it is truncated or "
                                      "damaged; fetch it again") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:  # a malformed pickle ("Unsupported operand 103")
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            detail = next((x for x in lines if x.lower().startswith("unsupported")), lines[-1] if lines else "")
            raise CheckpointFileError(
                f"{f} is not a readable PyTorch checkpoint of tensors (torch.load(weights_only=True): {detail[:120]}): "
                "it is truncated or damaged, or holds pickled objects other than tensors, which seqmix does not "
                "unpickle; fetch it again, or get the model as safetensors") from None
        raise CheckpointFileError(
            f"{f} holds pickled objects other than tensors (it calls {found[1]}). seqmix reads .bin weights with "
            "torch.load(weights_only=True), which runs no code from a checkpoint, and will not load this one: it "
            "may run code when unpickled. Get the model as safetensors, or ask its author for a plain state dict "
            "of tensors") from None
    except OSError as e:
        raise CheckpointFileError(f"{f} could not be read: {e.strerror or e}") from e
    except Exception as e:  # torch's zip reader (RuntimeError), a legacy pickle cut short (EOFError, KeyError)
        raise CheckpointFileError(f"{f} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                                  f"{_first_line(e)}): it is truncated or damaged; fetch or save it again") from None
    if not isinstance(out, dict):
        raise CheckpointFileError(f"{f} holds a {type(out).__name__}, not a dict of tensors")
    return out


def read_json(path: Path) -> object:
    """The JSON in `path`; a file that is not UTF-8 JSON is a CheckpointFileError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFileError(f"{path} is not valid JSON ({e}): it is truncated or damaged; fetch or save "
                                  "it again") from None


def read_weights(directory: PathLike, *, device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor stored in `directory`, by the first of: model.safetensors, model.safetensors.index.json
    (shards), pytorch_model.bin, pytorch_model.bin.index.json (shards). `.bin` files are read with
    `torch.load(weights_only=True)`, so no pickled code runs; a single .bin comes back as saved (a Lightning
    checkpoint nests its tensors under "state_dict"; the caller unwraps). Every file must lie inside
    `directory` (see `inside`); a file that cannot be read is a CheckpointFileError naming it."""
    path = Path(directory)
    for single, index, load in ((WEIGHTS_NAME, WEIGHTS_INDEX_NAME, _load_st), (BIN_NAME, BIN_INDEX_NAME, _load_bin)):
        if (path / single).is_file():
            return dict(load(inside(path, single, single), device))
        if (path / index).is_file():
            raw = read_json(inside(path, index, index))
            weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointFileError(f"{path / index} has no weight_map {{tensor name: shard file}}; it is "
                                          "damaged or not a shard index: fetch or save it again")
            shards = {s: inside(path, s, f"{path / index}") for s in sorted(set(weight_map.values()))}
            if lost := [s for s, f in shards.items() if not f.is_file()]:
                raise FileNotFoundError(f"{path} lacks shard(s) {lost} listed in {index}; the download or copy "
                                        f"is incomplete")
            out: dict[str, torch.Tensor] = {}
            for f in shards.values():
                out.update(load(f, device))
            if absent := sorted(k for k in weight_map if k not in out):
                raise CheckpointFileError(f"{index} lists tensors its shards do not hold: {absent[:5]}"
                                          f"{' ...' if len(absent) > 5 else ''}")
            return out
    raise FileNotFoundError(f"{path} holds no {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME}, {BIN_NAME} or {BIN_INDEX_NAME}")


def read_config_json(directory: PathLike, what: str = "a model directory holds config.json and its weights") -> dict:
    """config.json of `directory` as a dict; a missing file is a FileNotFoundError that says what was expected,
    one that is not a JSON object a CheckpointFileError naming it."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {what}")
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise CheckpointFileError(f"{path} holds a JSON {type(cfg).__name__}, not an object of config keys: it is "
                                  "not a model config; fetch or save the model again")
    return cfg
