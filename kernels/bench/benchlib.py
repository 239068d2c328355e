"""Shared pieces of the kernel benchmarks: timing, measured hardware ceilings, markdown tables, a time budget."""
from __future__ import annotations

import datetime
import os
import platform
import time
from typing import Callable, Optional, Sequence

import torch
import triton
from triton.testing import do_bench

TOKENS, H, HEAD_DIM = 65536, 16, 64  # B * T, heads, head dim of every table (issue 7)
TS = (1024, 2048, 4096, 8192, 16384)


def median_ms(fn: Callable, grad_to_none=None) -> float:
    """Median time of fn in ms (triton.testing.do_bench: L2 flushed between calls)."""
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy (read + write counted), measured now."""
    x = torch.empty(512 * 2**20, device="cuda").normal_()
    y = torch.empty_like(x)
    bw = 2 * x.numel() * 4 / (median_ms(lambda: y.copy_(x)) * 1e-3)
    del x, y
    return bw


def matmul_rate() -> float:
    """bf16 FLOP/s of an 8192^3 matmul on random data, measured now."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / (median_ms(lambda: a @ b) * 1e-3)


def header(title: str, notes: Sequence[str] = ()) -> list[str]:
    dev = torch.cuda.get_device_name()
    versions = f"torch {torch.__version__} · triton {triton.__version__} · python {platform.python_version()}"
    return [f"# {title}", "", f"{datetime.date.today().isoformat()} · {dev} · {versions}", "", *notes, ""]


def table(cols: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(r) + " |" for r in rows]


def fmt(x: Optional[float], digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.2f}x"


def write(out_dir: Optional[str], name: str, lines: list[str]) -> None:
    """With --out, write the report to out_dir/name (rewritten as tables complete, so a cut-off run keeps some)."""
    text = "\n".join(lines) + "\n"
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(text)


class Budget:
    """A wall-clock budget: cases after it runs out are reported as skipped instead of run."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def ok(self) -> bool:
        return self.left() > 0


def try_ms(fn: Callable, grad_to_none=None) -> Optional[float]:
    """median_ms, or None (printed reason) when the peer fails at this size (OOM, unsupported, ...)."""
    try:
        return median_ms(fn, grad_to_none)
    except Exception as e:  # noqa: BLE001 - a peer that fails at a size gets n/a, the run goes on
        print(f"  failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        torch.cuda.empty_cache()
        return None
