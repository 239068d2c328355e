"""A transformers fast tokenizer for a seqmix tokenizer name ("gpt2" or "bytes"), the form lm-eval's HFLM reads.

    tok = fast_tokenizer("gpt2")   # GPT-2 BPE: 50257 tokens, eos = pad = 50256, no BOS
    tok = fast_tokenizer("bytes")  # UTF-8 bytes 0..255 + eos 256 (pad = eos)

Both encode exactly as seqmix.tokenizer.get_tokenizer(name) does (the tests check it): in particular
"<|endoftext|>" written in the text stays text (split_special_tokens), as when the model was trained.
"""
from __future__ import annotations

from functools import lru_cache

EOS_TEXT = "<|endoftext|>"


def byte_alphabet() -> list[str]:
    """The printable character standing for each byte 0..255 in byte-level BPE (GPT-2's mapping): printable
    Latin-1 characters stand for themselves, the other bytes for the code points from 256 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]


def _backend(name: str):
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise ImportError("evaluation needs the `tokenizers` package: pip install -e '.[eval]'") from None
    from seqmix.tokenizer import get_tokenizer, gpt2_vocabulary

    if name == "gpt2":
        vocab, merges = gpt2_vocabulary()
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split regex, then bytes
    elif name == "bytes":
        vocab = {ch: b for b, ch in enumerate(byte_alphabet())} | {EOS_TEXT: 256}
        merges = []  # no merges: every byte stays one token, its id the byte's value
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    else:
        get_tokenizer(name)  # raises the error that lists the known names
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    return backend


@lru_cache(maxsize=None)
def fast_tokenizer(name: str):
    """A `transformers.PreTrainedTokenizerFast` equal to seqmix's tokenizer `name`; pad = eos, no BOS, so
    lm-eval conditions an empty context on the EOS token (its prefix_token_id). Built once per name."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        raise ImportError("evaluation needs transformers: pip install -e '.[eval]'") from None
    tok = PreTrainedTokenizerFast(tokenizer_object=_backend(name), eos_token=EOS_TEXT, pad_token=EOS_TEXT,
                                  split_special_tokens=True, name_or_path=f"seqmix-{name}")
    tok.padding_side = "left"
    return tok
