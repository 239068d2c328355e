"""The plugin surface of seqmix: every hook a plugin may implement, prefixed `seqmix_`."""
from typing import Callable

import pluggy

PROJECT = "seqmix"
ENTRY_POINT_GROUP = "seqmix"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def seqmix_register_mixers(register: Callable[[type], None]) -> None:
    """Register mixers: call `register(MixerClass)` once per `seqmix.mixer.Mixer` subclass you provide.

    Built-ins (`mlp`, `conv`) use this same hook. A plugin package exposes the module holding this
    implementation under the `seqmix` entry-point group in its pyproject.toml:

        [project.entry-points.seqmix]
        based = "seqmix_based.plugin"
    """


@hookspec
def seqmix_register_importers(register: Callable[..., None]) -> None:
    """Register checkpoint formats: call `register(model_type, importer, detect=None)` once per format.

    `importer(directory: pathlib.Path, config: dict, registry) -> seqmix.model.HybridLM` builds the model a
    foreign checkpoint describes (on the CPU) from `directory`, whose config.json is `config`; `seqmix.io.load`
    calls it for a config.json whose `model_type` is `model_type`, or, for configs without a model_type it
    knows, when `detect(config)` is true. Keep the importer to the format (config keys, which layer is which
    block, embedding, norms, head) and let each mixer rename its own tensors: build a
    `seqmix.io.importers.common.Layout` and call `import_checkpoint(..., source=model_type)`, which hands each
    block's tensors to `MixerClass.import_weights(model_type, tensors)`. The built-in importers (the Based
    repository's "based-repo", transformers' "llama" and "mamba") use this same hook.
    """
