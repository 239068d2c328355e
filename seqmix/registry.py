"""The mixer registry: a pluggy plugin manager built by a factory, entry points loaded one at a time."""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
from dataclasses import dataclass, field
from typing import Callable, Optional

import pluggy

from seqmix import hookspecs
from seqmix.mixer import STATE_KINDS, Mixer

# Mixers that ship as separate distributions in this repo: name -> (distribution, folder in the repo).
KNOWN_PLUGINS = {
    "based": ("seqmix-plugin-based", "plugins/based"),
    "swa": ("seqmix-plugin-swa", "plugins/swa"),
    "attn": ("seqmix-plugin-attention", "plugins/attention"),
    "mamba": ("seqmix-plugin-mamba", "plugins/mamba"),
}


@dataclass(frozen=True)
class MixerEntry:
    cls: type
    plugin: str  # entry-point name, or "builtin"
    dist: str  # providing distribution
    version: str


@dataclass(frozen=True)
class ImporterEntry:
    model_type: str
    importer: Callable  # (directory, config dict, registry) -> HybridLM
    detect: Optional[Callable[[dict], bool]]  # for configs whose model_type does not name the format
    plugin: str
    dist: str


@dataclass(frozen=True)
class PluginProblem:
    plugin: str
    dist: str
    message: str


class UnknownMixerError(KeyError):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class Registry:
    mixers: dict[str, MixerEntry] = field(default_factory=dict)
    problems: list[PluginProblem] = field(default_factory=list)
    importers: dict[str, ImporterEntry] = field(default_factory=dict)  # checkpoint model_type -> importer

    def __contains__(self, name: str) -> bool:
        return name in self.mixers

    def get(self, name: str) -> type:
        if name in self.mixers:
            return self.mixers[name].cls
        raise UnknownMixerError(self.unknown_message(name))

    def names(self) -> list[str]:
        return sorted(self.mixers)

    def suggest(self, name: str) -> Optional[str]:
        pool = list(self.mixers) + [n for n in KNOWN_PLUGINS if n not in self.mixers]
        close = difflib.get_close_matches(name, pool, n=1, cutoff=0.5)
        return close[0] if close else None

    def unknown_message(self, name: str) -> str:
        """Why `name` is not available and what to do about it (one paragraph)."""
        lines = [f"unknown mixer {name!r}."]
        hint = name if name in KNOWN_PLUGINS else None
        sug = self.suggest(name)
        if hint is None and sug is not None:
            if sug in self.mixers:
                lines.append(f"Did you mean {sug!r}?")
            else:
                hint = sug
        if hint is not None:
            dist, folder = KNOWN_PLUGINS[hint]
            lines.append(
                f"{hint!r} is provided by the plugin {dist}, which is not installed: "
                f"pip install {dist}  (from a clone: pip install -e {folder})"
            )
        for p in self.problems:
            if p.plugin == name or name in p.message:
                lines.append(f"Plugin {p.plugin} ({p.dist}) failed to load: {p.message}")
        lines.append("Registered mixers: " + (", ".join(self.names()) or "none"))
        return "\n".join(lines)


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus what seqmix learns while loading: failures and each plugin's distribution."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.problems: list[PluginProblem] = []
        self.dists: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)


# The core's own plugins (plugin name -> module), imported by name when a manager is built, as pytest does with
# its default plugins: the mixers mlp and conv, and the checkpoint importers.
BUILTIN_PLUGINS = {"builtin": "seqmix.builtins", "builtin-importers": "seqmix.io.importers"}


def get_plugin_manager(load_entry_points: bool = True) -> PluginManager:
    """Build a fresh plugin manager: built-ins first (BUILTIN_PLUGINS), then each `seqmix` entry point on its own.

    pluggy's own `load_setuptools_entrypoints` stops at the first entry point that fails to import, so
    entry points are loaded one by one and each failure is recorded in `pm.problems` instead of raised.
    """
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    for name, module in BUILTIN_PLUGINS.items():
        pm.register(importlib.import_module(module), name=name)
        pm.dists[name] = ("seqmix", _version("seqmix"))
    if load_entry_points:
        for ep in sorted(md.entry_points(group=hookspecs.ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            if pm.has_plugin(ep.name):
                first = pm.dists.get(ep.name, ("?", "?"))[0]
                pm.problems.append(PluginProblem(
                    ep.name, dist, f"plugin name {ep.name!r} is also used by {first}; {dist}'s copy skipped"))
                continue
            try:
                pm.register(ep.load(), name=ep.name)
            except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
                pm.problems.append(PluginProblem(ep.name, dist, f"{type(e).__name__}: {e}"))
                continue
            pm.dists[ep.name] = (dist, version)
    pm.check_pending()
    return pm


def load_registry(load_entry_points: bool = True) -> Registry:
    """Call every plugin's `seqmix_register_mixers` separately so one failure never hides the others."""
    pm = get_plugin_manager(load_entry_points)
    reg = Registry(problems=list(pm.problems))
    for impl in pm.hook.seqmix_register_mixers.get_hookimpls():  # registration order: built-ins first
        plugin_name = impl.plugin_name
        dist, version = pm.dists[plugin_name]

        def register(cls: type, _p=plugin_name, _d=dist, _v=version) -> None:
            _check_mixer_class(cls)
            if cls.name in reg.mixers:  # reported; the first registration stays, the plugin's others load
                other = reg.mixers[cls.name]
                reg.problems.append(PluginProblem(_p, _d, (
                    f"mixer name {cls.name!r} is registered by both {other.dist} and {_d}; {_d}'s is ignored "
                    f"(uninstall one of them)")))
                return
            reg.mixers[cls.name] = MixerEntry(cls, _p, _d, _v)

        try:
            impl.function(register=register)
        except Exception as e:  # noqa: BLE001
            reg.problems.append(PluginProblem(plugin_name, dist, f"{type(e).__name__}: {e}"))
    _load_importers(pm, reg)
    return reg


def _load_importers(pm: PluginManager, reg: Registry) -> None:
    """Call every plugin's `seqmix_register_importers`; the first importer of a model_type stays."""
    for impl in pm.hook.seqmix_register_importers.get_hookimpls():
        plugin_name, dist = impl.plugin_name, pm.dists[impl.plugin_name][0]

        def register(model_type: str, importer: Callable, *, detect=None, _p=plugin_name, _d=dist) -> None:
            if not callable(importer) or (detect is not None and not callable(detect)):
                raise TypeError(f"importer {model_type!r}: importer and detect must be callables")
            if model_type in reg.importers:
                other = reg.importers[model_type].dist
                reg.problems.append(PluginProblem(_p, _d, f"checkpoint format {model_type!r} is registered by both "
                                                          f"{other} and {_d}; {_d}'s is ignored"))
                return
            reg.importers[model_type] = ImporterEntry(model_type, importer, detect, _p, _d)

        try:
            impl.function(register=register)
        except Exception as e:  # noqa: BLE001
            reg.problems.append(PluginProblem(plugin_name, dist, f"{type(e).__name__}: {e}"))


def _check_mixer_class(cls: type) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Mixer)):
        raise TypeError(f"{cls!r} is not a subclass of seqmix.mixer.Mixer")
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} has no `name`")
    if cls.state_kind not in STATE_KINDS:
        raise TypeError(f"{cls.__name__}.state_kind must be one of {STATE_KINDS}, got {cls.state_kind!r}")


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "0+unknown"
