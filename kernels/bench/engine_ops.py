"""Operators per training step, DeepSpeed engine vs a plain loop, counted on a CPU (no GPU needed): a proxy for the
per-parameter work the engine adds (each counted aten op that computes is a kernel launch on a GPU).

    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29533 DS_ACCELERATOR=cpu \\
        python kernels/bench/engine_ops.py --engines ds1 ds0 plain

The model is based-360m's layout at d_model 64 (225 parameter tensors, like the real one), bf16, seq 64, micro 2.
Prints, per engine, the top-level aten ops of one step after two warm-up steps and the most frequent ones.
The plain loop's AdamW is the unfused (foreach-free) one on CPU, so compare the engine rows with each other.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402

import seqmix.train.schema as schema  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", nargs="+", default=["ds1", "ds0", "plain"], choices=["ds0", "ds1", "ds2", "plain"])
    ap.add_argument("--recipe", default="based-360m")
    args = ap.parse_args()
    bench_train.DEVICE = torch.device("cpu")
    load = schema.load_recipe
    schema.load_recipe = lambda path, overrides: load(path, [*overrides, "model.d_model=64", "model.n_heads=4",
                                                             "train.dtype=bf16", "train.compile=false"])
    for engine in args.engines:
        step, lm, _ = bench_train.seqmix_step(args.recipe, 64, 2, engine, False)
        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        ops = collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::") and (
            e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
        tensors = sum(1 for _ in lm.parameters())
        print(f"{engine}: {tensors} parameter tensors, {sum(ops.values()):,} top-level aten ops per step; "
              + ", ".join(f"{n[6:]} {c}" for n, c in ops.most_common(10)), flush=True)


if __name__ == "__main__":
    main()
