"""Where the Based Triton kernels can run (device, triton, compute capability) and which sizes they take; no triton
import here, so the mixer can ask before anything is compiled."""
from __future__ import annotations

import importlib.util
from typing import Optional, Union

import torch


def is_available(device: Union[str, torch.device, None] = None) -> Optional[str]:
    """None if the Triton kernels can run on `device` (default: the current CUDA device), else the reason."""
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        return f"the Triton kernels need a CUDA device, got {device.type!r}"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'seqmix-plugin-based[gpu]')"
    if not torch.cuda.is_available():
        return "CUDA is not available to torch on this machine"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"the kernels use bf16 tensor cores: compute capability >= 8.0 needed, this GPU has {major}.{minor}"
    return None


def unsupported_sizes(feature_dim: int, head_dim: int) -> Optional[str]:
    """None if the kernels handle feature dim F and value dim V, else the reason (F <= 32; V in 16..128, % 16)."""
    if feature_dim > 32 or head_dim % 16 or not 16 <= head_dim <= 128:
        return (f"the kernels support feature dim F <= 32 and value dim V a multiple of 16 in [16, 128]; "
                f"this layer has F={feature_dim}, V={head_dim}")
    return None
