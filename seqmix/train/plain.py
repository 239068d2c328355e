"""A training step without DeepSpeed, for benchmarks and numerics tests: low-precision weights with fp32 master
copies, PyTorch's fused AdamW on the masters, global-norm clipping: the arithmetic of DeepSpeed's bf16
optimizer at world size 1, so `kernels/bench/bench_train.py` can put a price on the engine itself.

    trainer = PlainTrainer(model.cuda().bfloat16(), lr=8e-4, weight_decay=0.1, grad_clip=1.0)
    loss = trainer.step(lambda: model.loss(x, y))
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class PlainTrainer:
    """One optimizer step = forward + backward of `loss_fn`, gradients copied to fp32 masters, clipped, AdamW on
    the masters (fused on CUDA), the masters copied back into the model's weights."""

    def __init__(self, model: nn.Module, *, lr: float = 8e-4, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, grad_clip: float = 1.0):
        from seqmix.train.loop import param_groups

        self.model, self.grad_clip = model, grad_clip
        groups = param_groups(model, weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        self.masters = [p.detach().float().clone() for p in self.params]
        it = iter(self.masters)
        master_groups = [{"params": [next(it) for _ in g["params"]], "weight_decay": g["weight_decay"]}
                         for g in groups]
        fused = all(p.is_cuda for p in self.params)
        self.opt = torch.optim.AdamW(master_groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)

    def step(self, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run one step; returns the loss (a detached fp32 scalar on the device, not synchronised)."""
        loss = loss_fn()
        loss.backward()
        for m, p in zip(self.masters, self.params):
            m.grad = p.grad.float() if p.grad is not None else torch.zeros_like(m)
            p.grad = None
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.masters, self.grad_clip, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.masters)
        return loss.detach()
