"""The conformance suite must catch broken mixers: each check fails on a mixer with the matching bug."""
import pytest
import torch

from seqmix.builtins.conv import BaseConv
from seqmix.testing import TOLERANCES, assert_close, check_mixer_conformance


class LeakyConv(BaseConv):
    """Non-causal: mixes in the NEXT token."""

    def forward(self, x_BTD, *, state=None, return_state=False):
        y = super().forward(x_BTD, state=state, return_state=return_state)
        nxt = torch.roll(x_BTD, -1, dims=1)
        return (y[0] + 0.1 * nxt, y[1]) if return_state else y + 0.1 * nxt


class ForgetfulConv(BaseConv):
    """Ignores a carried state in forward (chunked prefill breaks)."""

    def forward(self, x_BTD, *, state=None, return_state=False):
        out = super().forward(x_BTD, state=None, return_state=return_state)
        return (out[0], state if state is not None else out[1]) if return_state else out


class WrongStepConv(BaseConv):
    """step() is off by a constant."""

    def step(self, x_BD, state):
        y, state = super().step(x_BD, state)
        return y + 1e-2, state


class LyingStateConv(BaseConv):
    def state_bytes(self, batch_size, seqlen, dtype=torch.float32):
        return super().state_bytes(batch_size, seqlen, dtype) + 4


@pytest.mark.parametrize("cls,match", [
    (LeakyConv, "recurrence|changed earlier"),
    (ForgetfulConv, "chunked prefill|step after"),
    (WrongStepConv, "recurrence"),
    (LyingStateConv, "state_bytes"),
])
def test_broken_mixers_fail(cls, match):
    with pytest.raises(AssertionError, match=match):
        check_mixer_conformance((cls, {}), dtype=torch.float32)


def test_assert_close_flags_nan_and_error():
    a = torch.ones(3)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(torch.tensor([1.0, float("nan"), 1.0]), a, torch.float32, "x")
    with pytest.raises(AssertionError, match="normalised max error"):
        assert_close(a + 10 * TOLERANCES[torch.float32], a, torch.float32, "x")
    assert_close(a + 0.1 * TOLERANCES[torch.float32], a, torch.float32, "x")
