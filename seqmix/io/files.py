"""Checkpoint files: safetensors / .bin weights read (single or sharded), shards planned and written, folders published
atomically. Knows file layouts only, no model."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Iterator, Union

import torch

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
    model.safetensors.index.json in the Hugging Face layout, one shard at a time in host memory. Returns the file
    names written."""
    from safetensors.torch import save_file

    shards = plan_shards(state, parse_size(max_shard_size))
    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for keys, fname in zip(shards, names):
        save_file({k: state[k].contiguous().cpu() for k in keys}, str(directory / fname), metadata={"format": "pt"})
    if n > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())},
                 "weight_map": {k: fname for keys, fname in zip(shards, names) for k in keys}}
        (directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        names.append(WEIGHTS_INDEX_NAME)
    return names


@contextmanager
def staged_dir(directory: PathLike) -> Iterator[Path]:
    """A temporary sibling folder to fill; when the block ends without an error it replaces `directory`
    (publish_dir), so the files appear all at once and a crash never leaves a half-written folder."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield tmp
        publish_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def read_config_json(directory: PathLike, what: str = "a model directory holds config.json and its weights") -> dict:
    """config.json of `directory` as a dict; a missing file is a FileNotFoundError that says what was expected."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {what}")
    cfg = json.loads(path.read_text())
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds a JSON {type(cfg).__name__}, not an object of config keys")
    return cfg
