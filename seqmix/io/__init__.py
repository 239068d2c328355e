"""Checkpoints in and out: `save` / `load` of seqmix's format, and `load` of every format an importer reads.

    files.py      safetensors / .bin reading (single or sharded, paths kept inside the folder), shard writing
    publish.py    what a save may replace, staged folders swapped in under a lock, leftovers of killed saves
    hub.py        Hugging Face hub names -> local snapshots
    native.py     seqmix's own format (config.json + safetensors)
    strict.py     the one strict loader (missing / unexpected / misshapen keys, named) and its errors
    loader.py     `load`: dispatch on config.json's model_type over the registered importers
    importers/    the built-in importers (Based repo, transformers Llama / Mamba), registered through
                  the `seqmix_register_importers` hook like a plugin's
"""
from seqmix.io.files import parse_size, read_weights
from seqmix.io.hub import resolve_model_dir
from seqmix.io.loader import load
from seqmix.io.native import load_config, save
from seqmix.io.publish import SaveError, SaveRefusedError
from seqmix.io.strict import CheckpointError, CheckpointFileError, ConversionError

__all__ = ["CheckpointError", "CheckpointFileError", "ConversionError", "SaveError", "SaveRefusedError", "load",
           "load_config", "parse_size", "read_weights", "resolve_model_dir", "save"]
