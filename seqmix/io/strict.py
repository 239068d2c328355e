"""The one strict loader: tensors onto a model, or an error naming every missing, unexpected and misshapen key."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not fit the model its config describes."""


class CheckpointFileError(CheckpointError):
    """A checkpoint file seqmix will not read: truncated or damaged, not JSON where JSON belongs, a config of the
    wrong shape, pickled objects other than tensors, or a path that leaves the model folder. The message names
    the file and the fix."""


class ConversionError(CheckpointError):
    """A foreign checkpoint seqmix cannot import: a setting it cannot express, or tensors that do not fit."""


@dataclass
class Mismatch:
    """What keeps a checkpoint's tensors from loading, each entry named as the checkpoint names it."""
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shapes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def message(self, what: str) -> str:
        return (f"{what}:\n  missing keys: {self.missing or 'none'}\n  unexpected keys: {self.unexpected or 'none'}"
                f"\n  shape mismatches: {self.shapes or 'none'}")


def load_strict(model: nn.Module, tensors: dict[str, torch.Tensor], *, what: str,
                origin: dict[str, str] | None = None, mismatch: Mismatch | None = None,
                reported: Iterable[str] = (), hint: str = "", error: type = CheckpointError) -> nn.Module:
    """Load `tensors` (seqmix names) into `model`, cast to each parameter's dtype; raise `error` unless every key
    of the model's state dict is there with its shape and nothing else is.

    `origin` maps a seqmix name to the checkpoint's own name for it (used in the message; a key without one is
    named as is). `mismatch` carries what an importer already found (foreign keys it could not map, or that
    a mapping needed and did not find); model keys under a prefix in `reported` were covered by those and are
    not listed again. The message starts with `what` and ends with `hint`."""
    origin = origin or {}
    found = mismatch or Mismatch()
    reported = tuple(reported)

    def name(k: str) -> str:
        src = origin.get(k)
        return k if src is None or src == k else f"{src} (-> {k})"

    expected = model.state_dict()
    found.missing += [name(k) for k in sorted(set(expected) - set(tensors)) if not any(map(k.startswith, reported))]
    found.unexpected += sorted(origin.get(k, k) for k in set(tensors) - set(expected))
    for k in sorted(set(expected) & set(tensors)):
        if tensors[k].shape != expected[k].shape:
            src = origin.get(k, k)
            ours = f" {k}" if src != k else ""
            found.shapes.append(f"{src}: checkpoint {list(tensors[k].shape)} vs seqmix{ours} {list(expected[k].shape)}")
    if found:
        raise error(found.message(what) + (f"\n{hint}" if hint else ""))
    model.load_state_dict({k: tensors[k].to(v.dtype) for k, v in expected.items()})
    return model
