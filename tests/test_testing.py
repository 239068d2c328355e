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


class OutOfPlaceStepConv(BaseConv):
    """step() returns new state tensors: the recurrence is right, but a CUDA graph replays over the old ones."""

    def step(self, x_BD, state):
        return super().step(x_BD, {k: v.clone() for k, v in state.items()})


class SharedCounterConv(BaseConv):
    """Counts tokens in a 0-d tensor shared by the batch: not batch-first, so generation cannot gather its rows
    (prompts of two lengths), although every output is right."""

    def init_state(self, batch_size, *, max_seqlen, device=None, dtype=torch.float32):
        return {**super().init_state(batch_size, max_seqlen=max_seqlen, device=device, dtype=dtype),
                "t": torch.zeros((), dtype=torch.int64, device=device)}

    def forward(self, x_BTD, *, state=None, return_state=False):
        out = super().forward(x_BTD, state=state, return_state=return_state)
        if return_state:
            out[1].setdefault("t", torch.zeros((), dtype=torch.int64, device=x_BTD.device)).add_(x_BTD.shape[1])
        return out

    def step(self, x_BD, state):
        state["t"].add_(1)
        return super().step(x_BD, state)


class UnsavedScaleConv(BaseConv):
    """Draws an output scale at construction and keeps it neither in its args nor in its weights
    (persistent=False): a saved config + weights would not rebuild it."""

    def __init__(self, ctx, kernel_size=3, expand=2, impl="auto"):
        super().__init__(ctx, kernel_size, expand, impl)
        self.register_buffer("scale", torch.rand(ctx.d_model) + 0.5, persistent=False)

    def forward(self, x_BTD, *, state=None, return_state=False):
        out = super().forward(x_BTD, state=state, return_state=return_state)
        return (out[0] * self.scale, out[1]) if return_state else out * self.scale

    def step(self, x_BD, state):
        y, state = super().step(x_BD, state)
        return y * self.scale, state


class OldArgsConv(BaseConv):
    """Keeps the old convention of setting `self.args` itself, and forgets kernel_size in it."""

    def __init__(self, ctx, kernel_size=3, expand=2, impl="auto"):
        super().__init__(ctx, kernel_size, expand, impl)
        self.args = {"expand": expand, "impl": impl}


@pytest.mark.parametrize("cls,match", [
    (LeakyConv, "recurrence|changed earlier"),
    (ForgetfulConv, "chunked prefill|step after"),
    (WrongStepConv, "recurrence"),
    (LyingStateConv, "state_bytes"),
    (OutOfPlaceStepConv, r"step replaced state\['conv'\] by a new tensor"),
    (SharedCounterConv, r"state\['t'\] has shape \(\); every state tensor must have the batch first"),
    (UnsavedScaleConv, "rebuilt from self.args and the weights"),
])
def test_broken_mixers_fail(cls, match):
    with pytest.raises(AssertionError, match=match):
        check_mixer_conformance((cls, {"kernel_size": 4}), dtype=torch.float32)


def test_a_mixer_that_sets_self_args_itself_is_refused():
    """`self.args` is the base's one copy: the old convention (a mixer setting it, here without kernel_size, which
    made a rebuild silently take the default) is an error at construction, inside the suite too."""
    with pytest.raises(TypeError, match=r"mixer 'conv': __init__ changed self.args"):
        check_mixer_conformance((OldArgsConv, {"kernel_size": 4}), dtype=torch.float32)


def test_the_shared_counter_breaks_generate_on_prompts_of_two_lengths():
    """What the batch-first rule protects: the same mixer inside a model cannot take two prompt lengths."""
    from seqmix.config import resolve_model
    from seqmix.model import HybridLM
    from seqmix.registry import Registry, load_registry

    reg = load_registry(load_entry_points=False)
    reg = Registry(mixers={**reg.mixers, "conv": reg.mixers["conv"].__class__(SharedCounterConv, "test", "t", "0")})
    model = HybridLM(resolve_model("conv,mlp", d_model=16, n_heads=2, vocab_size=32, registry=reg), reg)
    with pytest.raises(IndexError):
        model.generate([[1, 2, 3], [4, 5]], max_new_tokens=2, temperature=0)


def test_assert_close_flags_nan_and_error():
    a = torch.ones(3)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(torch.tensor([1.0, float("nan"), 1.0]), a, torch.float32, "x")
    with pytest.raises(AssertionError, match="normalised max error"):
        assert_close(a + 10 * TOLERANCES[torch.float32], a, torch.float32, "x")
    assert_close(a + 0.1 * TOLERANCES[torch.float32], a, torch.float32, "x")
