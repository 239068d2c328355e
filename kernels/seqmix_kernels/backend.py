"""Whether the Triton kernels can run on a device (CUDA, or Triton's CPU interpreter for tests), and the check
every Triton op makes on its inputs. Mixers choose between a kernel and its reference through their
implementation table (`seqmix.mixer.Impl`), which asks `triton_unavailable`. Nothing here imports triton.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional, Union

import torch


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


def check_device(what: str, *tensors: Optional[torch.Tensor]) -> None:
    """Raise a clear error when a Triton op gets tensors it cannot run on (before Triton fails obscurely).

    Skipped while torch.compile traces (the host-side checks would break the graph; eager runs check)."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if t is None:
            continue
        why = triton_unavailable(t.device)
        if why is not None:
            raise RuntimeError(f"{what}: {why}. Build the module with impl='reference' to run it here.")
