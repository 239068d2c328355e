"""Next-token sampling from logits: greedy, temperature, top-k and top-p (nucleus), reproducible per seed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from the logits of the real vocabulary.

    temperature: 0 = greedy (argmax); otherwise logits are divided by it before the softmax (after subtracting
    each row's maximum, so a tiny temperature cannot overflow). A temperature below float32's smallest normal
    number (about 1.2e-38), which float32 cannot divide by, is greedy too.
    top_k: keep the k most likely tokens (0 = no limit). top_p: keep the smallest set of most likely tokens
    whose probability reaches p (1 = no limit); the most likely token is always kept.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = no limit), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = no limit), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """True when the choice is deterministic: temperature 0 (or one too small for float32) or top_k 1."""
        return self.temperature < _TINY or self.top_k == 1


def make_generator(seed: Optional[int], device: torch.device) -> Optional[torch.Generator]:
    """A generator on `device` seeded with `seed`, or None (torch's global generator) when seed is None."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


def sample_next(
    logits_BV: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """The next token of every sequence, int64 [B], drawn from logits_BV [B, V] (computed in fp32).

    Only the V columns given can be drawn: pass the logits of the real vocabulary, never the padded tail.
    Ties in greedy mode go to the lowest token id.
    """
    if params.greedy:
        return logits_BV.argmax(-1)
    x_BV = logits_BV.float()
    x_BV = (x_BV - x_BV.amax(-1, keepdim=True)) / params.temperature  # <= 0 everywhere: never +inf or NaN
    V = x_BV.shape[-1]
    if 0 < params.top_k < V:
        kth_B1 = torch.topk(x_BV, params.top_k, dim=-1).values[:, -1:]
        x_BV = x_BV.masked_fill(x_BV < kth_B1, float("-inf"))
    if params.top_p < 1:
        x_BV = _top_p_filter(x_BV, params.top_p)
    probs_BV = torch.softmax(x_BV, dim=-1)
    # argmax(p_i / E_i) with E_i ~ Exp(1) is a draw from p (an exponential race); unlike torch.multinomial it
    # needs no host sync on CUDA and is cheap for a 50k vocabulary. E is kept > 0 so masked tokens stay at 0.
    race_BV = torch.empty_like(probs_BV).exponential_(generator=generator).clamp_min_(torch.finfo(torch.float32).tiny)
    return (probs_BV / race_BV).argmax(-1)


def _top_p_filter(x_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the nucleus: a token is kept if the tokens more likely than it
    hold less than `top_p` of the probability, so the most likely token always stays."""
    sorted_BV, order_BV = torch.sort(x_BV, dim=-1, descending=True, stable=True)
    p_BV = torch.softmax(sorted_BV, dim=-1)
    before_BV = torch.cumsum(p_BV, dim=-1) - p_BV  # mass of the strictly more likely tokens
    drop_sorted_BV = before_BV >= top_p
    drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
    return x_BV.masked_fill(drop_BV, float("-inf"))
