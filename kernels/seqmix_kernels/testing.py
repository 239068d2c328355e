"""Helpers for testing Triton kernels against their references: CPU runs under Triton's interpreter, NaN-filled outputs.

Used by the kernel tests of seqmix-kernels and of the plugins (pytest is not needed to import this module):

    kernel_mod, = import_kernel_modules("seqmix_kernels.short_conv.triton")   # at test-module import
    _kernel_env = kernel_test_fixture(kernel_mod)   # each test: the interpreter on CPU, NaN in every torch.empty
    DTYPES = kernel_dtypes()                        # fp32, fp16, and bf16 on a GPU only

Triton reads TRITON_INTERPRET when @triton.jit runs (the import of a kernel module) and again at launch; it is
set around those two moments only, so other tests in the same process are not affected.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
from types import ModuleType
from typing import Optional

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
INTERPRETED = HAS_TRITON and not HAS_CUDA
BF16_SKIP_REASON = ("bf16 is checked on the GPU only: the Triton interpreter emulates it with numpy (no bf16 "
                    "arithmetic there), so a CPU run would test the emulation, slowly")


def import_kernel_modules(*names: str) -> list[ModuleType]:
    """Import kernel modules, under the Triton interpreter when there is no GPU ([] when triton is missing)."""
    if not HAS_TRITON:
        return []
    saved = os.environ.get("TRITON_INTERPRET")
    if INTERPRETED:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        return [importlib.import_module(n) for n in names]
    finally:
        if INTERPRETED:
            if saved is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = saved


def use_interpreter(monkeypatch) -> None:
    """Within one test (pytest's monkeypatch): launches and `available_impls` see the interpreter on CPU."""
    if INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


class _NaNTorch:
    """Stands in for the `torch` module of a launcher: empty / empty_like return NaN-filled float tensors."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _fill(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(math.nan) if t.is_floating_point() else t

    def empty(self, *args, **kwargs):
        return self._fill(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._fill(torch.empty_like(*args, **kwargs))


def poison_allocations(monkeypatch, *modules: ModuleType) -> None:
    """Make every torch.empty / empty_like of these modules NaN-filled, so an output a kernel skips shows up."""
    for m in modules:
        monkeypatch.setattr(m, "torch", _NaNTorch())


def kernel_test_fixture(*modules: Optional[ModuleType]):
    """An autouse pytest fixture for a kernel test module (assign it to a module-level name): during each test the
    interpreter is on where there is no GPU (`use_interpreter`) and the allocations of `modules` are NaN-filled
    (`poison_allocations`; None entries, from a missing triton, are skipped)."""
    import pytest

    @pytest.fixture(autouse=True)
    def _kernel_test_env(monkeypatch):
        use_interpreter(monkeypatch)
        poison_allocations(monkeypatch, *[m for m in modules if m is not None])

    return _kernel_test_env


def kernel_dtypes() -> list:
    """fp32, fp16 and bf16 for pytest.mark.parametrize; bf16 is skipped without a GPU (BF16_SKIP_REASON)."""
    import pytest

    return [torch.float32, torch.float16,
            pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not HAS_CUDA, reason=BF16_SKIP_REASON))]
