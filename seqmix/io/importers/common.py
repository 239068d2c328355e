"""What every importer shares: a foreign checkpoint's tensors placed on a seqmix model by a `Layout` (the format's
knowledge: embedding, norms, head, which prefix holds which block's mixer), each mixer renaming its own tensors with
its `import_weights`, then one strict load."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Callable

import torch

from seqmix.config import ModelConfig
from seqmix.io.strict import ConversionError, Mismatch, load_strict
from seqmix.model import HybridLM, build_model


class LayerTensors(Mapping):
    """One mixer's tensors in the checkpoint's own names, its layer prefix removed, as `Mixer.import_weights` sees
    them. Read-only; remembers which names were read (every tensor not read is reported as unexpected)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = tensors
        self.read: set[str] = set()

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._tensors[name]  # a missing name raises KeyError: the importer reports it as a missing key
        self.read.add(name)
        return t

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


@dataclass
class Layout:
    """Where one checkpoint keeps what: `embed` (the embedding), `head` (the LM head, dropped when the model ties
    it, after checking that it equals the embedding), `names` (seqmix name -> checkpoint name for the other
    tensors outside the mixers: norms), `mixers` (block index -> the checkpoint's prefix of that block's mixer
    tensors, e.g. "model.layers.3.mlp."), and `ignore` (keys outside all of these that are known and unused)."""
    embed: str
    head: str = "lm_head.weight"
    names: dict[str, str] = field(default_factory=dict)
    mixers: dict[int, str] = field(default_factory=dict)
    ignore: Callable[[str], bool] = lambda key: False


def _head_names(layout: Layout, sd: dict[str, torch.Tensor], config: ModelConfig, what: str) -> dict[str, str]:
    """`names` of the embedding and the untied head; a tied model drops a stored head unless it differs."""
    if not config.tie_embeddings:
        return {"embed.weight": layout.embed, "lm_head.weight": layout.head}
    head, embed = sd.get(layout.head), sd.get(layout.embed)
    if head is not None and embed is not None and not torch.equal(head, embed):
        raise ConversionError(f"{what}: {layout.head} differs from {layout.embed}, but the model ties its head to "
                              f"the embedding (tie_word_embeddings); refusing to drop the head")
    return {"embed.weight": layout.embed}


def _mixer_groups(sd: dict[str, torch.Tensor], prefixes: dict[str, int], skip: set[str]):
    """{block: {name without prefix: tensor}} for the keys under a mixer prefix, and the keys under none."""
    groups: dict[int, dict[str, torch.Tensor]] = {b: {} for b in prefixes.values()}
    rest = []
    for key, t in sd.items():
        if key in skip:
            continue
        cut = next((i + 1 for i, c in enumerate(key) if c == "." and key[: i + 1] in prefixes), None)
        if cut is None:
            rest.append(key)
        else:
            groups[prefixes[key[:cut]]][key[cut:]] = t
    return groups, rest


def import_checkpoint(config: ModelConfig, sd: dict[str, torch.Tensor], layout: Layout, *, source: str, what: str,
                      registry=None, pad_vocab: bool = False, hint: str = "") -> HybridLM:
    """Build the model of `config` (on the CPU) and load the foreign state dict `sd` onto it through `layout`:
    each mixer's tensors go through `type(mixer).import_weights(source, LayerTensors(...))`. With `pad_vocab`, an
    embedding / head of exactly vocab_size rows gets zero rows up to the padded vocabulary (never returned).
    Raises ConversionError naming, in the checkpoint's own names where it has them, every key that is missing,
    unexpected or misshapen; the message starts with `what`."""
    names = _head_names(layout, sd, config, what) | layout.names
    model = build_model(config, device="cpu", registry=registry)
    expected = model.state_dict()
    out = {ours: sd[key] for ours, key in names.items() if key in sd}
    origin, found, reported = dict(names), Mismatch(), []
    skip = set(names.values()) | ({layout.head} if config.tie_embeddings else set())
    groups, rest = _mixer_groups(sd, {p: b for b, p in layout.mixers.items()}, skip)
    for b, tensors in groups.items():
        prefix, cls, here = layout.mixers[b], type(model.blocks[b].mixer), f"blocks.{b}.mixer."
        view = LayerTensors(tensors)
        try:
            mapped = cls.import_weights(source, view)
        except KeyError as e:  # a name the mixer needs
            found.missing.append(f"{prefix}{e.args[0]} (-> {here}*, a {cls.name!r} layer)")
            reported.append(here)
            continue
        except (RuntimeError, ValueError) as e:  # tensors that do not fit together (a fusion of odd shapes)
            found.shapes.append(f"{prefix}* (a {cls.name!r} layer): {type(e).__name__}: {e}")
            reported.append(here)
            continue
        by_id = {id(t): k for k, t in tensors.items()}
        for name, t in mapped.items():
            src = by_id.get(id(t), by_id.get(id(t._base)) if t._base is not None else None)  # same tensor or a view
            out[here + name] = t
            origin[here + name] = here + name if src is None else prefix + src  # None: built from several
        for k in expected:  # absent parameters: named where the checkpoint would have them under the same name
            if k.startswith(here) and k not in out:
                origin[k] = prefix + k[len(here):]
        found.unexpected += sorted(prefix + k for k in tensors if k not in view.read)
    found.unexpected += sorted(k for k in rest if not layout.ignore(k))
    if pad_vocab:
        for name in ("embed.weight", "lm_head.weight"):
            t = out.get(name)
            if t is not None and t.dim() == 2 and t.shape[0] == config.vocab_size < config.padded_vocab_size:
                out[name] = torch.cat([t, t.new_zeros(config.padded_vocab_size - config.vocab_size, t.shape[1])])
    return load_strict(model, out, what=f"{what} does not match the model its config describes ({config.spec})",
                       origin=origin, mismatch=found, reported=reported, hint=hint, error=ConversionError)

