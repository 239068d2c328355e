"""Which implementation of an op can run where: the Triton kernels (CUDA, or Triton's CPU interpreter) or the reference.

Mixers call `resolve_impl` once, at construction: "auto" is the Triton path on a machine with a CUDA device and
triton installed, the PyTorch reference elsewhere. At call time `impl_for` sends tensors that are not on a CUDA
device (a CPU copy of a model built on a GPU machine) to the reference when "auto" was asked; an explicitly
named kernel is never swapped. Nothing here imports triton.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional, Union

import torch

IMPLS = ("reference", "triton")


def triton_interpreting() -> bool:
    """True when Triton's own interpreter is on (TRITON_INTERPRET=1): kernels then run on CPU tensors, slowly.

    Kernel modules are decorated when first imported, so the setting must be on before that import (tests).
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_unavailable(device: Union[str, torch.device] = "cuda") -> Optional[str]:
    """None if the Triton kernels can run on `device`, else what is missing (a sentence for an error message)."""
    if not _triton_installed():
        return "triton is not installed (pip install 'seqmix-kernels[gpu]', or pip install triton)"
    dev = torch.device(device)
    if dev.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is visible to torch"
    if dev.type == "cpu" and triton_interpreting():
        return None
    return (f"the Triton kernels need a CUDA device, got {dev.type} (on CPU they run only under Triton's "
            f"interpreter, TRITON_INTERPRET=1, which is for tests)")


def available_impls(device: Union[str, torch.device] = "cpu") -> dict[str, Optional[str]]:
    """{"reference": None, "triton": None or the reason it cannot run on `device`}."""
    return {"reference": None, "triton": triton_unavailable(device)}


def resolve_impl(impl: str, what: str) -> str:
    """Turn an `impl` argument into "reference" or "triton", once; raises if the asked one cannot run here.

    "auto" means the kernel when this machine has a CUDA device and triton, else the reference (never the
    interpreter). `what` names the op or mixer in the error message.
    """
    if impl == "auto":
        return "triton" if torch.cuda.is_available() and triton_unavailable("cuda") is None else "reference"
    if impl not in IMPLS:
        raise ValueError(f"{what}: impl must be one of auto, {', '.join(IMPLS)}; got {impl!r}")
    if impl == "triton":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        why = triton_unavailable(device)
        if why is not None:
            raise RuntimeError(f"{what}: impl='triton' cannot run on this machine: {why}. "
                               f"Use impl='auto' or impl='reference'.")
    return impl


def impl_for(resolved: str, asked: str, x: torch.Tensor, reference: str = "reference") -> str:
    """The implementation to run on `x`: `resolved` (from resolve_impl) for CUDA tensors or when `asked` named one
    explicitly; under "auto", tensors on any other device take `reference`."""
    return resolved if asked != "auto" or x.is_cuda else reference


def check_device(what: str, *tensors: Optional[torch.Tensor]) -> None:
    """Raise a clear error when a Triton op gets tensors it cannot run on (before Triton fails obscurely)."""
    for t in tensors:
        if t is None:
            continue
        why = triton_unavailable(t.device)
        if why is not None:
            raise RuntimeError(f"{what}: {why}. Build the module with impl='reference' to run it here.")
