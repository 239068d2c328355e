"""The shared conformance suite: one test body that every mixer (and every hybrid stack) must pass.

Use from a plugin's tests:

    from seqmix.testing import check_mixer_conformance
    def test_conformance(): check_mixer_conformance("swa:7", dtype=torch.float32)

Each check compares against a reference path of the same mixer: parallel views agree with each other and with
the token recurrence (`step`), `prefill` into a fresh state and `step` after it continue the forward, chunked
prefill with a carried state equals one forward, gradients are finite and agree between views, outputs are
causal, and `state_bytes` equals the bytes `init_state` allocates (and does not grow with length unless the state
kind is "cache"). The state rules are checked too: a flat dict of batch-first tensors whose rows can be gathered
and scattered, and a `step` that updates them in place; and `self.args` (with the weights) rebuilds the mixer.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence, Union

import torch

from seqmix.mixer import BlockContext, Mixer, state_nbytes

# Normalised max error: max|a - b| / max|b| must not exceed this. One table, keyed by dtype.
TOLERANCES = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}

CHUNKS = (17, 20, 26)  # odd chunk sizes for T = 63


def chunk_bounds(T: int, chunks: Sequence[int] = CHUNKS) -> list[tuple[int, int]]:
    """Consecutive [t0, t1) spans of the given sizes; the last span takes the rest of T."""
    spans, t0 = [], 0
    for i, c in enumerate(chunks):
        t1 = T if i == len(chunks) - 1 else min(T, t0 + c)
        spans.append((t0, t1))
        t0 = t1
    return spans


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Fail on NaN/inf or on a normalised max error above TOLERANCES[dtype]; the message says where."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{what}: {int((~torch.isfinite(actual)).sum())} non-finite values")
    if not torch.isfinite(expected).all():
        raise AssertionError(f"{what}: the reference has non-finite values")
    a, b = actual.float(), expected.float()
    scale = b.abs().max().clamp_min(1e-6)
    err = ((a - b).abs().max() / scale).item()
    tol = TOLERANCES[dtype]
    if err > tol:
        idx = torch.unravel_index((a - b).abs().argmax(), a.shape)
        raise AssertionError(
            f"{what}: normalised max error {err:.3g} > {tol:g} ({dtype}); at {tuple(int(i) for i in idx)}: "
            f"{a[idx].item():.6g} vs {b[idx].item():.6g}"
        )


def make_mixer(
    spec: Union[str, tuple[type, dict]],
    *,
    d_model: int = 48,
    n_heads: int = 4,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    registry=None,
    **overrides,
) -> Mixer:
    """Build one mixer from a one-layer spec ("swa:7") or a (class, kwargs) pair; `overrides` replace args."""
    if isinstance(spec, str):
        from seqmix.spec import parse_spec

        layers = parse_spec(spec, registry)
        if len(layers) != 1:
            raise ValueError(f"make_mixer needs a one-layer spec, got {len(layers)} layers from {spec!r}")
        from seqmix.registry import load_registry

        cls = (registry or load_registry()).get(layers[0].name)
        kwargs = {**layers[0].kwargs, **overrides}
    else:
        cls, kwargs = spec[0], {**spec[1], **overrides}
    torch.manual_seed(seed)
    ctx = BlockContext(d_model=d_model, n_heads=n_heads, layer_idx=0, n_blocks=2)
    return cls(ctx, **kwargs).to(device=device, dtype=dtype)


def _views(mixer: Mixer, device) -> list[str]:
    """The explicit implementations (values of an `impl` arg) that can run here, "auto" excluded."""
    arg = next((a for a in type(mixer).spec_args if a.name == "impl"), None)
    if arg is None or arg.choices is None:
        return []
    ok = type(mixer).available_impls(device)
    return [c for c in arg.choices if c != "auto" and ok.get(c, "unknown") is None]


def _rebuild(mixer: Mixer, impl: Optional[str] = None) -> Mixer:
    """The same mixer (same args and weights), with another `impl` if given."""
    args = dict(mixer.args)
    if impl is not None:
        args["impl"] = impl
    other = type(mixer)(mixer.ctx, **args)
    p = next(mixer.parameters(), None)
    if p is not None:
        other = other.to(device=p.device, dtype=p.dtype)
    other.load_state_dict(mixer.state_dict())
    return other


def check_views_agree(mixer: Mixer, x_BTD: torch.Tensor, dtype: torch.dtype) -> None:
    """Every runnable `impl` gives the same output and the same input/weight gradients."""
    views = _views(mixer, x_BTD.device)
    if len(views) < 2:
        return
    torch.manual_seed(1)
    cot = torch.randn_like(x_BTD)
    results = {}
    for v in views:
        m = _rebuild(mixer, v)
        x = x_BTD.detach().clone().requires_grad_(True)
        y = m(x)
        (y.float() * cot.float()).sum().backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        results[v] = (y.detach(), x.grad, grads)
    ref = views[0]
    for v in views[1:]:
        assert_close(results[v][0], results[ref][0], dtype, f"{mixer.name}: impl={v} vs impl={ref} output")
        assert_close(results[v][1], results[ref][1], dtype, f"{mixer.name}: impl={v} vs impl={ref} d/dx")
        for n, g in results[ref][2].items():
            assert_close(results[v][2][n], g, dtype, f"{mixer.name}: impl={v} vs impl={ref} d/d{n}")


def check_recurrence(mixer: Mixer, x_BTD: torch.Tensor, y_BTD: torch.Tensor, dtype) -> None:
    """step() from init_state, token by token, reproduces forward."""
    B, T, _ = x_BTD.shape
    state = mixer.init_state(B, max_seqlen=T, device=x_BTD.device, dtype=x_BTD.dtype)
    ys = []
    for t in range(T):
        y_t, state = mixer.step(x_BTD[:, t], state)
        ys.append(y_t)
    assert_close(torch.stack(ys, 1), y_BTD, dtype, f"{mixer.name}: step-by-step recurrence vs forward")


def check_step_after_prefill(mixer: Mixer, x_BTD, y_BTD, dtype, prefill: int) -> None:
    B, T, _ = x_BTD.shape
    state = mixer.init_state(B, max_seqlen=T, device=x_BTD.device, dtype=x_BTD.dtype)
    y0, state = mixer(x_BTD[:, :prefill], state=state, return_state=True)
    assert_close(y0, y_BTD[:, :prefill], dtype, f"{mixer.name}: prefill with a fresh state vs forward")
    ys = []
    for t in range(prefill, T):
        y_t, state = mixer.step(x_BTD[:, t], state)
        ys.append(y_t)
    assert_close(torch.stack(ys, 1), y_BTD[:, prefill:], dtype, f"{mixer.name}: step after a {prefill}-token prefill")


def check_prefill(mixer: Mixer, x_BTD, y_BTD, dtype, prefill: int) -> None:
    """`prefill` fills a fresh preallocated state in place (the tensors stay the caller's) and equals forward;
    steps after it continue the forward."""
    B, T, _ = x_BTD.shape
    state = mixer.init_state(B, max_seqlen=T, device=x_BTD.device, dtype=x_BTD.dtype)
    held = dict(state or {})
    y0 = mixer.prefill(x_BTD[:, :prefill], state)
    assert_close(y0, y_BTD[:, :prefill], dtype, f"{mixer.name}: prefill into a fresh state vs forward")
    _check_same_tensors(mixer, held, state, "prefill")
    ys = []
    for t in range(prefill, T):
        y_t, state = mixer.step(x_BTD[:, t], state)
        ys.append(y_t)
    assert_close(torch.stack(ys, 1), y_BTD[:, prefill:], dtype, f"{mixer.name}: step after prefill()")


def _check_same_tensors(mixer: Mixer, held: dict, state, what: str) -> None:
    if state is None and not held:
        return
    if not isinstance(state, dict) or set(state) != set(held):
        raise AssertionError(f"{mixer.name}: {what} must update the state dict in place, got "
                             f"{type(state).__name__} {sorted(state) if isinstance(state, dict) else ''}")
    for k, v in held.items():
        if state[k] is not v:
            raise AssertionError(f"{mixer.name}: {what} replaced state[{k!r}] by a new tensor; it must update the "
                                 f"caller's tensors in place (CUDA graphs replay over them)")


def check_state_rules(mixer: Mixer, x_BTD, dtype, prefill: int) -> None:
    """A state is None or a flat dict of tensors, each with the batch first; rows gathered into another order
    (generation groups prompts by length, beam search reorders) continue as their own sequences, and scattered
    back give the same state; `step` updates the tensors in place."""
    B, T, _ = x_BTD.shape
    state = mixer.init_state(B, max_seqlen=T, device=x_BTD.device, dtype=x_BTD.dtype)
    if state is None:
        return
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AssertionError(f"{mixer.name}: a state must be a flat dict of tensors (or None), got {state!r:.200}")
    for k, v in state.items():
        if v.dim() == 0 or v.shape[0] != B:
            raise AssertionError(f"{mixer.name}: state[{k!r}] has shape {tuple(v.shape)}; every state tensor must "
                                 f"have the batch first ([B, ...], B = {B}) so rows can be gathered and scattered")
    mixer(x_BTD[:, :prefill], state=state, return_state=True)
    rows = torch.arange(B, device=x_BTD.device).roll(1)  # another order of the same rows
    gathered = {k: v[rows] for k, v in state.items()}
    held = dict(state)
    y_B, stepped = mixer.step(x_BTD[:, prefill], state)
    _check_same_tensors(mixer, held, stepped, "step")
    y_g, gathered = mixer.step(x_BTD[rows, prefill], gathered)
    assert_close(y_g, y_B[rows], dtype, f"{mixer.name}: step on gathered state rows vs the same rows of the batch")
    back = {k: torch.empty_like(v) for k, v in stepped.items()}
    for k, v in back.items():
        v[rows] = gathered[k]
        assert_close(v, stepped[k], dtype, f"{mixer.name}: state[{k!r}] gathered, stepped and scattered back")


def check_rebuild(mixer: Mixer, x_BTD, y_BTD, dtype) -> None:
    """`type(m)(m.ctx, **m.args)` with m's weights is m: the same parameters, implementations and outputs (what a
    saved config + weights must reproduce)."""
    declared = [a.name for a in type(mixer).spec_args]
    if list(mixer.args) != declared:
        raise AssertionError(f"{mixer.name}: self.args has {list(mixer.args)}, the declared args are {declared}")
    other = _rebuild(mixer)
    shapes = {k: tuple(v.shape) for k, v in mixer.state_dict().items()}
    if {k: tuple(v.shape) for k, v in other.state_dict().items()} != shapes:
        raise AssertionError(f"{mixer.name}: rebuilding from self.args gives other parameters than the mixer's")
    impls = {a: getattr(mixer, a) for a in type(mixer).impl_tables()}
    if {a: getattr(other, a) for a in impls} != impls:
        raise AssertionError(f"{mixer.name}: rebuilding from self.args picks other implementations than {impls}")
    assert_close(other(x_BTD), y_BTD, dtype, f"{mixer.name}: rebuilt from self.args and the weights vs the mixer")


def check_chunked_prefill(mixer: Mixer, x_BTD, y_BTD, dtype, chunks: Sequence[int] = CHUNKS) -> None:
    """forward over chunks with the state carried from init_state equals one forward."""
    B, T, _ = x_BTD.shape
    ys, state = [], mixer.init_state(B, max_seqlen=T, device=x_BTD.device, dtype=x_BTD.dtype)
    for t0, t1 in chunk_bounds(T, chunks):
        y, state = mixer(x_BTD[:, t0:t1], state=state, return_state=True)
        ys.append(y)
    assert_close(torch.cat(ys, 1), y_BTD, dtype, f"{mixer.name}: chunked prefill {tuple(chunks)} vs one forward")


def check_causality(mixer: Mixer, x_BTD, y_BTD, t: int) -> None:
    x2 = x_BTD.clone()
    x2[:, t:] = torch.randn_like(x2[:, t:]) * 3
    y2 = mixer(x2)
    if not torch.equal(y2[:, :t], y_BTD[:, :t]):
        d = (y2[:, :t].float() - y_BTD[:, :t].float()).abs().max().item()
        if d > 1e-6 * max(1.0, y_BTD.float().abs().max().item()):
            raise AssertionError(f"{mixer.name}: changing tokens >= {t} changed earlier outputs by {d:.3g}")


def check_state_bytes(mixer: Mixer, B: int, T: int, dtype, device) -> None:
    for L in (T, 4 * T):
        st = mixer.init_state(B, max_seqlen=L, device=device, dtype=dtype)
        got, claimed = state_nbytes(st), mixer.state_bytes(B, L, dtype)
        if got != claimed:
            raise AssertionError(f"{mixer.name}: state_bytes({B}, {L}) = {claimed} but init_state allocates {got}")
    grows = mixer.state_bytes(B, 4 * T, dtype) != mixer.state_bytes(B, T, dtype)
    if grows != (mixer.state_kind == "cache"):
        raise AssertionError(f"{mixer.name}: state_kind={mixer.state_kind!r} but state grows with length: {grows}")


def check_gradients(mixer: Mixer, x_BTD) -> None:
    x = x_BTD.detach().clone().requires_grad_(True)
    mixer.zero_grad(set_to_none=True)
    mixer(x).float().square().mean().backward()
    if x.grad is None or not torch.isfinite(x.grad).all() or x.grad.abs().max() == 0:
        raise AssertionError(f"{mixer.name}: input gradient missing, zero or non-finite")
    for n, p in mixer.named_parameters():
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all()):
            raise AssertionError(f"{mixer.name}: gradient of {n} missing or non-finite")
    mixer.zero_grad(set_to_none=True)


def check_mixer_conformance(
    spec: Union[str, tuple[type, dict]],
    *,
    dtype: torch.dtype = torch.float32,
    B: int = 3,
    T: int = 63,
    d_model: int = 48,
    n_heads: int = 4,
    device: Union[str, torch.device] = "cpu",
    prefill: Optional[int] = None,
    registry=None,
    **overrides,
) -> Mixer:
    """Run the whole conformance triangle for one mixer; raises AssertionError naming the failed check."""
    mixer = make_mixer(spec, d_model=d_model, n_heads=n_heads, dtype=dtype, device=device, registry=registry,
                       **overrides)
    torch.manual_seed(0)
    x = torch.randn(B, T, d_model, device=device, dtype=dtype)
    with torch.no_grad():
        y = mixer(x)
        if y.shape != x.shape or y.dtype != x.dtype:
            raise AssertionError(f"{mixer.name}: forward gave {tuple(y.shape)} {y.dtype}, want {tuple(x.shape)} {dtype}")
        if not torch.isfinite(y).all():
            raise AssertionError(f"{mixer.name}: forward output has non-finite values")
        y2, _ = mixer(x, state=None, return_state=True)
        assert_close(y2, y, dtype, f"{mixer.name}: forward with return_state=True vs plain forward")
        check_recurrence(mixer, x, y, dtype)
        p = prefill if prefill is not None else T // 2 + 1
        check_step_after_prefill(mixer, x, y, dtype, p)
        check_prefill(mixer, x, y, dtype, p)
        check_chunked_prefill(mixer, x, y, dtype)
        check_causality(mixer, x, y, T // 3)
        check_state_rules(mixer, x, dtype, p)
        check_rebuild(mixer, x, y, dtype)
    check_state_bytes(mixer, B, T, dtype, device)
    check_gradients(mixer, x)
    check_views_agree(mixer, x, dtype)
    return mixer


def check_model_conformance(
    spec: str,
    *,
    dtype: torch.dtype = torch.float32,
    B: int = 3,
    T: int = 63,
    d_model: int = 48,
    n_heads: int = 4,
    vocab_size: int = 101,
    device: Union[str, torch.device] = "cpu",
    registry=None,
):
    """A whole HybridLM: prefill + step == forward, chunked prefill == forward, causality, state bytes."""
    from seqmix.config import resolve_model
    from seqmix.model import HybridLM
    from seqmix.registry import load_registry

    registry = registry or load_registry()
    cfg = resolve_model(spec, d_model=d_model, n_heads=n_heads, vocab_size=vocab_size, max_seqlen=T,
                        registry=registry)
    torch.manual_seed(0)
    model = HybridLM(cfg, registry).to(device=device, dtype=dtype)
    tokens = torch.randint(0, vocab_size, (B, T), device=device)
    with torch.no_grad():
        logits = model(tokens)
        if logits.shape != (B, T, vocab_size):
            raise AssertionError(f"{spec}: logits shape {tuple(logits.shape)} != {(B, T, vocab_size)}")
        p = T // 2 + 1
        states = model.init_states(B, T)
        lp, states = model(tokens[:, :p], states=states, return_states=True)
        assert_close(lp, logits[:, :p], dtype, f"{spec}: prefill logits")
        steps = []
        for t in range(p, T):
            lt, states = model.step(tokens[:, t], states)
            steps.append(lt)
        assert_close(torch.stack(steps, 1), logits[:, p:], dtype, f"{spec}: step after prefill")
        states, outs = model.init_states(B, T), []
        for t0, t1 in chunk_bounds(T):
            lc, states = model(tokens[:, t0:t1], states=states, return_states=True)
            outs.append(lc)
        assert_close(torch.cat(outs, 1), logits, dtype, f"{spec}: chunked prefill")
        t = T // 3
        tok2 = tokens.clone()
        tok2[:, t:] = torch.randint(0, vocab_size, (B, T - t), device=device)
        d = (model(tok2)[:, :t].float() - logits[:, :t].float()).abs().max().item()
        if d > 1e-5 * max(1.0, logits.float().abs().max().item()):
            raise AssertionError(f"{spec}: changing tokens >= {t} changed earlier logits by {d:.3g}")
    got = sum(state_nbytes(s) for s in model.init_states(B, T, dtype=dtype))
    if got != model.state_bytes(B, T, dtype):
        raise AssertionError(f"{spec}: model.state_bytes {model.state_bytes(B, T, dtype)} != allocated {got}")
    return model
