"""The embedded default corpus: four Shakespeare plays (public domain), so `recipes/pretrain.py --recipe tiny`
trains with no download. Where the text comes from and how it was converted: corpus/SOURCE.md."""
from __future__ import annotations

from pathlib import Path

CORPUS_DIR = Path(__file__).parent / "corpus"


def default_corpus_files() -> list[Path]:
    """The corpus text files, sorted by name; each file is one document."""
    files = sorted(CORPUS_DIR.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"the embedded corpus is missing from {CORPUS_DIR}; reinstall seqmix")
    return files
