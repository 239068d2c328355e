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
