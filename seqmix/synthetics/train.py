"""One MQAR training run: a model built from a spec exactly as `seqmix build` makes it, trained on the training
segments and scored on each test segment after every epoch (zoology's Trainer: AdamW, cosine per epoch, early stop)."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from seqmix.synthetics.mqar import TEST_SEGMENTS, TRAIN_SEGMENTS, MQARData, Segment, generate_all, query_accuracy


@dataclass(frozen=True)
class DataConfig:
    """The MQAR segments of a sweep; every run of the sweep sees the same examples."""

    train: tuple[Segment, ...] = TRAIN_SEGMENTS
    test: tuple[Segment, ...] = TEST_SEGMENTS
    vocab_size: int = 8192
    power_a: float = 0.01
    seed: int = 0

    @property
    def max_test_len(self) -> int:
        return max(s.seq_len for s in self.test)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def check(self) -> None:
        if not self.train or not self.test:
            raise ValueError("MQAR data needs at least one training and one test segment")
        for s in self.train + self.test:
            s.check(self.vocab_size)

    def generate(self, device) -> tuple[list[MQARData], list[MQARData]]:
        kw = dict(vocab_size=self.vocab_size, power_a=self.power_a, seed=self.seed, device=device)
        return generate_all(self.train, split="train", **kw), generate_all(self.test, split="test", **kw)


@dataclass(frozen=True)
class RunConfig:
    """One point of a sweep at one learning rate."""

    spec: str
    d_model: int
    lr: float
    heads: int = 1
    epochs: int = 8
    batch_size: int = 256
    weight_decay: float = 0.1
    early_stop: float = 0.99  # stop once test accuracy exceeds this
    seed: int = 0  # weight init
    precision: str = "bf16"  # bf16 autocast on CUDA; CPU always runs fp32
    steps_per_epoch: Optional[int] = None  # cap on optimizer steps per epoch (smoke tests); None = the whole data


def build(run: RunConfig, data: DataConfig, device="cpu"):
    """The HybridLM of `run`: seqmix.config.resolve_model + seqmix.model.build_model, as `seqmix build` does."""
    from seqmix.config import resolve_model
    from seqmix.model import build_model

    config = resolve_model(run.spec, d_model=run.d_model, n_heads=run.heads, vocab_size=data.vocab_size,
                           max_seqlen=data.max_test_len)
    if device != "meta":
        torch.manual_seed(run.seed)
    return build_model(config, device=device)


def query_logits(model, inputs_BT: torch.Tensor, qpos_BN: torch.Tensor) -> torch.Tensor:
    """Logits [B, N, V] at the query positions only (the only labelled ones), without a host sync."""
    h_BTD = model.hidden(inputs_BT)
    h_BND = h_BTD.gather(1, qpos_BN[..., None].expand(-1, -1, h_BTD.shape[-1]))
    return F.linear(h_BND, model.head_weight())[..., : model.config.vocab_size]


def _autocast(run: RunConfig, device: torch.device):
    if device.type == "cuda" and run.precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, test: list[MQARData], run: RunConfig, batch_size: int = 256) -> tuple[float, dict[str, float]]:
    """zoology's valid/accuracy: per example the fraction of its queries predicted exactly, averaged over all test
    examples; and the same average per test segment."""
    model.eval()
    device = next(model.parameters()).device
    per_seg, all_acc = {}, []
    for d in test:
        accs = []
        for s in range(0, len(d), batch_size):
            with _autocast(run, device):
                logits = query_logits(model, d.inputs[s:s + batch_size], d.qpos[s:s + batch_size])
            accs.append(query_accuracy(logits.argmax(-1), d.values[s:s + batch_size]))
        acc = torch.cat(accs)
        all_acc.append(acc)
        per_seg[d.segment.name] = acc.mean().item()
    return torch.cat(all_acc).mean().item(), per_seg


def train_run(run: RunConfig, data: DataConfig, train: list[MQARData], test: list[MQARData], device,
              on_epoch: Optional[Callable[[int, float, float], None]] = None) -> dict:
    """Train `run` and return its record (accuracy overall and per segment after the last epoch, history, time)."""
    device = torch.device(device)
    t0 = time.perf_counter()
    model = build(run, data, device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=run.weight_decay, fused=fused)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=run.epochs, eta_min=0.0)
    bs = run.batch_size
    order = [(i, s) for i, d in enumerate(train) for s in range(0, len(d), bs)]  # zoology's order: by segment
    if run.steps_per_epoch is not None:
        order = order[: run.steps_per_epoch]
    history, losses, epoch_seconds = [], [], []
    acc, per_seg = 0.0, {}
    for epoch in range(run.epochs):
        te = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        for i, s in order:
            d = train[i]
            with _autocast(run, device):
                logits_BNV = query_logits(model, d.inputs[s:s + bs], d.qpos[s:s + bs])
            loss = F.cross_entropy(logits_BNV.float().flatten(0, 1), d.values[s:s + bs].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
        losses.append(loss_sum.item() / max(len(order), 1))
        acc, per_seg = evaluate(model, test, run)
        history.append(acc)
        epoch_seconds.append(time.perf_counter() - te)
        if on_epoch is not None:
            on_epoch(epoch + 1, acc, losses[-1])
        if losses[-1] != losses[-1]:
            break  # NaN loss: this learning rate diverged; the record says so
        if acc > run.early_stop:
            break
        sched.step()
    return {"accuracy": acc, "accuracy_per_segment": per_seg, "history": history, "train_loss": losses,
            "epochs_run": len(history), "early_stopped": acc > run.early_stop, "epoch_seconds": epoch_seconds,
            "params": model.num_params(), "seconds": time.perf_counter() - t0}
