"""Training data: text -> packed, memory-mapped token shards, and a deterministic, resumable batch order.

On disk (`<data.cache_dir>/<tokenizer>-<fingerprint>/`): `train_000.bin, ...`, `val_000.bin, ...` (raw uint16 or
uint32 token ids; documents joined with the tokenizer's EOS after each) and `meta.json`, written last and
published with one rename, so a half-written cache is never used. The fingerprint covers the source (paths,
sizes, mtimes or the dataset name), the tokenizer and the split settings, not `seq_len`.

A sample is a window of seq_len + 1 tokens (inputs and shifted targets); windows tile each shard without
overlap. Epoch e visits the samples in a permutation seeded by (seed, e). Optimizer step s consumes positions
[s * global_batch, (s + 1) * global_batch) of that order, rank-major within each micro-batch, so the batch of a
step depends only on (seed, step): resuming needs no data-loader state, and the samples of a step are the same
for any world size and micro batch.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from seqmix.train.schema import DataSection

FORMAT_VERSION = 1
META_NAME = "meta.json"


class DataError(ValueError):
    """Training data that cannot be used (not UTF-8, no text, shorter than one sample); names the file or key."""


# -- documents --------------------------------------------------------------------------------------------
def _records_to_docs(records: Iterable[str], doc_regex: Optional[str]) -> Iterator[str]:
    """Without doc_regex each record is a document; with it, a record matching it starts a new document."""
    if doc_regex is None:
        yield from (r for r in records if r.strip())
        return
    pattern, buf = re.compile(doc_regex), []
    for rec in records:
        if pattern.match(rec.rstrip("\r\n")) and buf:
            doc = "".join(buf)
            if doc.strip():
                yield doc
            buf = []
        buf.append(rec if rec.endswith("\n") else rec + "\n")
    doc = "".join(buf)
    if doc.strip():
        yield doc


def _jsonl_rows(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno} is not a JSON line ({e.msg}); a .jsonl file holds one JSON "
                                    "object per line") from None
                if not isinstance(row, dict) or field not in row:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise DataError(f"{path}:{lineno} has no field {field!r} (set data.text_field); keys: {keys}")
                if not isinstance(row[field], str):
                    raise DataError(f"{path}:{lineno}: field {field!r} is a {type(row[field]).__name__}, not text")
                yield row[field]


def _file_docs(paths: list[Path], data: DataSection) -> Iterator[str]:
    for path in paths:
        try:
            if path.suffix == ".jsonl":
                yield from _records_to_docs(_jsonl_rows(path, data.text_field), data.doc_regex)
            elif data.doc_regex is None:
                text = path.read_text(encoding="utf-8")
                if text.strip():
                    yield text
            else:
                with open(path, encoding="utf-8") as f:
                    yield from _records_to_docs(f, data.doc_regex)
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}"
                            f" cannot be decoded); convert it (e.g. iconv -f latin1 -t utf-8) or leave it out of "
                            "data.files") from None


def resolve_files(data: DataSection) -> list[Path]:
    """The input files of a `files` or `embedded` source, in a fixed (sorted) order."""
    if data.source == "embedded":
        from seqmix.data import default_corpus_files

        return default_corpus_files()
    paths: list[Path] = []
    for pattern in data.files:
        hits = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not hits:
            raise FileNotFoundError(f"data.files: {pattern!r} matches no file")
        paths += [Path(h) for h in hits if Path(h).is_file()]
    return paths


def _hf_docs(data: DataSection, split: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ImportError("data.source=hf needs the `datasets` package: pip install datasets") from None
    ds = datasets.load_dataset(data.hf_path, data.hf_name, split=split, streaming=data.hf_streaming)
    yield from _records_to_docs((row[data.text_field] for row in ds), data.doc_regex)


def fingerprint(data: DataSection) -> str:
    """What the token shards depend on (not seq_len: one cache serves every context length)."""
    key: dict = {k: getattr(data, k) for k in ("source", "tokenizer", "text_field", "doc_regex", "max_tokens",
                                               "val_fraction", "shard_tokens")}
    key["version"] = FORMAT_VERSION
    if data.source in ("embedded", "files"):
        key["files"] = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in resolve_files(data)]
    elif data.source == "hf":
        key["hf"] = [data.hf_path, data.hf_name, data.hf_split, data.hf_val_split]
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# -- tokenising into shards -------------------------------------------------------------------------------
class _ShardWriter:
    """Appends token arrays to <split>_000.bin, <split>_001.bin, ... of at most `shard_tokens` tokens each."""

    def __init__(self, directory: Path, split: str, dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, np.dtype(dtype), shard_tokens
        self.shards: list[dict] = []
        self._f = None

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while ids.size:
            if self._f is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            ids[:room].tofile(self._f)
            self.shards[-1]["tokens"] += int(min(room, ids.size))
            ids = ids[room:]

    def _open_next(self) -> None:
        if self._f is not None:
            self._f.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._f = open(self.directory / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> list[dict]:
        if self._f is not None:
            self._f.close()
            self._f = None
        return self.shards


def _tokenize(docs: Iterable[str], tok, writer: _ShardWriter, max_tokens: Optional[int], batch_docs: int = 256) -> int:
    """Encode documents in batches, EOS after each, into `writer`; returns the number of documents written."""
    n_docs, total, batch = 0, 0, []

    def flush() -> bool:
        nonlocal total
        ids = [np.asarray(x, dtype=np.int64) for x in tok.encode_batch(batch)]
        eos = np.array([tok.eos_id], dtype=np.int64)
        arr = np.concatenate([p for x in ids for p in (x, eos)])
        if max_tokens is not None and total + arr.size >= max_tokens:
            writer.write(arr[: max_tokens - total])
            total = max_tokens
            return False
        writer.write(arr)
        total += arr.size
        return True

    for doc in docs:
        batch.append(doc)
        n_docs += 1
        if len(batch) == batch_docs or sum(map(len, batch)) > (8 << 20):
            if not flush():
                return n_docs
            batch = []
    if batch:
        flush()
    return n_docs


def _carve_tail(directory: Path, shards: list[dict], n: int, dtype) -> tuple[list[dict], np.ndarray]:
    """Cut the last `n` tokens off the shard files (truncating them); returns the shards left and the tail."""
    itemsize, pieces = np.dtype(dtype).itemsize, []
    for entry in reversed(shards):
        if n == 0:
            break
        path, have = directory / entry["file"], entry["tokens"]
        take = min(have, n)
        pieces.append(np.fromfile(path, dtype=dtype, offset=(have - take) * itemsize))
        os.truncate(path, (have - take) * itemsize)
        entry["tokens"], n = have - take, n - take
    for entry in shards:
        if entry["tokens"] == 0:
            (directory / entry["file"]).unlink()
    tail = np.concatenate(pieces[::-1]) if pieces else np.zeros(0, dtype=dtype)
    return [e for e in shards if e["tokens"] > 0], tail


def prepare_data(data: DataSection, log: Callable[[str], None] = lambda s: None) -> Path:
    """Tokenise the recipe's data source into shards under data.cache_dir unless they are there already.

    Safe to call from several processes at once: each writes into its own temporary folder, the first to finish
    publishes it with a rename and the others discard theirs. Returns the shard directory.
    """
    from seqmix.tokenizer import get_tokenizer

    if data.source == "synthetic":
        raise ValueError("data.source=synthetic has no shards to prepare")
    tok = get_tokenizer(data.tokenizer)
    cache = Path(data.cache_dir)
    out = cache / f"{tok.name}-{fingerprint(data)}"
    if (out / META_NAME).is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=cache))
    try:
        dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
        log(f"tokenising the {data.source} corpus with the {tok.name} tokenizer into {out}")
        docs = (_hf_docs(data, data.hf_split) if data.source == "hf" else _file_docs(resolve_files(data), data))
        train = _ShardWriter(tmp, "train", dtype, data.shard_tokens)
        n_docs = _tokenize(docs, tok, train, data.max_tokens)
        train_shards = train.close()
        val = _ShardWriter(tmp, "val", dtype, data.shard_tokens)
        if data.source == "hf" and data.hf_val_split:
            _tokenize(_hf_docs(data, data.hf_val_split), tok, val, None)
        else:
            n_val = int(sum(s["tokens"] for s in train_shards) * data.val_fraction)
            train_shards, tail = _carve_tail(tmp, train_shards, n_val, dtype)
            val.write(tail)
        meta = {"version": FORMAT_VERSION, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id, "dtype": np.dtype(dtype).name, "documents": n_docs,
                "train": train_shards, "val": val.close()}
        if not sum(s["tokens"] for s in train_shards):
            files = [str(p) for p in resolve_files(data)] if data.source in ("files", "embedded") else None
            where = "" if files is None else f" ({', '.join(files[:5]) or 'data.files matched no file'})"
            raise DataError(f"data.source={data.source} produced no training tokens: the text is empty or only "
                            f"whitespace{where}; give files with text in data.files")
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.replace(tmp, out)
        except OSError:  # another process published the same shards first
            if not (out / META_NAME).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- reading --------------------------------------------------------------------------------------------
class PackedTokens:
    """The samples of one split: non-overlapping windows of seq_len + 1 tokens over memory-mapped shards."""

    def __init__(self, directory, split: str, seq_len: int):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / META_NAME).read_text())
        self.seq_len, self.split = seq_len, split
        dtype = np.dtype(self.meta["dtype"])
        self.shards = [np.memmap(self.directory / s["file"], dtype=dtype, mode="r")
                       for s in self.meta[split] if s["tokens"] > seq_len]
        counts = [(len(s) - 1) // seq_len for s in self.shards]
        self.offsets = np.cumsum([0] + counts)
        self.num_samples = int(self.offsets[-1])
        self.num_tokens = sum(s["tokens"] for s in self.meta[split])

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        j = (int(i) - int(self.offsets[k])) * self.seq_len
        return np.asarray(self.shards[k][j : j + self.seq_len + 1], dtype=np.int64)


def training_split(directory, seq_len: int) -> PackedTokens:
    """The train split of a shard directory, refused when it holds no sample of seq_len + 1 tokens."""
    ds = PackedTokens(directory, "train", seq_len)
    if len(ds) == 0:
        longest = max((s["tokens"] for s in ds.meta["train"]), default=0)
        raise DataError(
            f"data.seq_len={seq_len} needs samples of {seq_len + 1} tokens but the training text holds "
            f"{ds.num_tokens} tokens (at most {longest} in one shard): lower data.seq_len to at most "
            f"{max(1, longest - 1)}, or give more text")
    return ds


class SyntheticTokens:
    """Uniformly random tokens, the same for a given (seed, index): for throughput benchmarks."""

    def __init__(self, seq_len: int, vocab_size: int, seed: int = 0, num_samples: int = 1 << 20):
        self.seq_len, self.vocab_size, self.seed, self.num_samples = seq_len, vocab_size, seed, num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        return np.random.default_rng([self.seed, int(i)]).integers(0, self.vocab_size, self.seq_len + 1)


class StepSampler:
    """Sample indices of (step, micro-batch) for one rank; a pure function of the step, so resumable."""

    def __init__(self, num_samples: int, *, global_batch: int, micro_batch: int, world_size: int, rank: int,
                 seed: int, shuffle: bool = True):
        if num_samples < 1:
            raise DataError("the split has no complete sample: it holds fewer than seq_len + 1 tokens; "
                             "lower data.seq_len or give more text")
        self.n, self.G, self.mb, self.W, self.rank = num_samples, global_batch, micro_batch, world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self._perm: tuple[int, Optional[np.ndarray]] = (-1, None)

    def _order(self, epoch: int) -> Optional[np.ndarray]:
        if not self.shuffle:
            return None
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._perm[1]

    def indices(self, step: int, micro: int) -> np.ndarray:
        start = step * self.G + micro * self.mb * self.W + self.rank * self.mb
        pos = np.arange(start, start + self.mb)
        out = np.empty(self.mb, dtype=np.int64)
        for epoch in np.unique(pos // self.n):
            sel = pos // self.n == epoch
            order = self._order(int(epoch))
            local = pos[sel] % self.n
            out[sel] = local if order is None else order[local]
        return out


def get_batch(dataset, indices: np.ndarray, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, T], targets [B, T]) int64 for the given sample indices."""
    rows = torch.from_numpy(np.stack([dataset[int(i)] for i in indices]))
    rows = rows.to(device) if device is not None else rows
    return rows[:, :-1], rows[:, 1:]
