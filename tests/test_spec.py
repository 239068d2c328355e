"""Tests for the spec language (seqmix/spec.py): DESIGN §2 examples, errors with carets, canonical round-trips."""
from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.builtins.conv import BaseConv
from seqmix.builtins.mlp import SwiGLU
from seqmix.mixer import Arg, Mixer
from seqmix.registry import MixerEntry, Registry
from seqmix.spec import LayerSpec, SpecError, format_spec, make_layer, parse_spec

BASED_360M = "conv,mlp,(based,mlp,swa:129,mlp,(conv,mlp)*3)*5,conv,mlp"
BASED_1B = ("conv,mlp,(based,mlp,swa:129,mlp,(conv,mlp)*3)*5,conv,mlp,based,mlp,swa:129,mlp,(conv,mlp)*4,"
            "based,mlp,swa:129,mlp,conv,mlp")


# -- a registry of fake mixers with the plugins' declared args, so these tests need no plugin ---------
class _Fake(Mixer):
    def __init__(self, ctx, **spec_args):
        super().__init__(ctx)


def _fake(name: str, *spec_args: Arg) -> type:
    return type(f"Fake_{name}", (_Fake,), {"name": name, "spec_args": spec_args})


FAKES = [
    _fake("based",
          Arg("impl", str, "auto", choices=("auto", "quadratic", "linear", "recurrent", "parallel")),
          Arg("feature_dim", int, 16, min=1), Arg("heads", int, None, min=1),
          Arg("feature_map", str, "taylor", positional=False), Arg("eps", float, 1e-12, min=0, positional=False)),
    _fake("swa", Arg("window", int, 128, min=1), Arg("heads", int, None, min=1),
          Arg("rotary_dim", int, None, min=0, positional=False)),
    _fake("attn", Arg("heads", int, None, min=1), Arg("kv_heads", int, None, min=1),
          Arg("rotary_dim", int, None, min=0, positional=False),
          Arg("rope_base", float, 10000.0, min=1.0, positional=False)),
    _fake("mamba", Arg("d_state", int, 16, min=1), Arg("expand", int, 2, min=1),
          Arg("fast_path", bool, True, positional=False)),
    _fake("mamba2", Arg("d_state", int, 64, min=1), Arg("headdim", int, 64, min=1, positional=False)),
]


def make_registry(*, without: tuple[str, ...] = ()) -> Registry:
    classes = [c for c in [*FAKES, SwiGLU, BaseConv] if c.name not in without]
    return Registry(mixers={c.name: MixerEntry(c, "fake", "fake-dist", "0") for c in classes})


REG = make_registry()
CLASSES = {name: entry.cls for name, entry in REG.mixers.items()}


def P(text: str, **kw) -> list[LayerSpec]:
    return parse_spec(text, REG, **kw)


def F(layers, **kw) -> str:
    return format_spec(layers, REG, **kw)


L = LayerSpec


# -- DESIGN §2 examples ---------------------------------------------------------------------------
def test_design_examples():
    assert P("based:linear,swa:64,conv") == [L("based", (("impl", "linear"),)), L("swa", (("window", 64),)),
                                             L("conv")]
    tiled = P("based,swa64,mlp", n_blocks=36)
    assert len(tiled) == 36 and tiled == [L("based"), L("swa", (("window", 64),)), L("mlp")] * 12
    assert P("(conv,mlp,based,mlp)*4") == [L("conv"), L("mlp"), L("based"), L("mlp")] * 4
    assert P("attn:heads=16:kv_heads=4,mlp") == [L("attn", (("heads", 16), ("kv_heads", 4))), L("mlp")]
    assert P("mamba:d_state=8") == P("mamba:8") == P("mamba8") == [L("mamba", (("d_state", 8),))]
    assert P("mamba:d_state=16") == [L("mamba")]  # 16 is the default: defaults are not stored


@pytest.mark.parametrize("spec, n_layers, based_at, swa_at", [
    (BASED_360M, 27, [1, 6, 11, 16, 21], [2, 7, 12, 17, 22]),
    (BASED_1B, 36, [1, 6, 11, 16, 21, 27, 33], [2, 7, 12, 17, 22, 28, 34]),
])
def test_based_architectures_match_reference_layouts(spec, n_layers, based_at, swa_at):
    layers = P(spec)
    assert len(layers) == 2 * n_layers
    assert all(layer == L("mlp") for layer in layers[1::2])
    mixers = layers[0::2]  # REFERENCE.md numbers the (mixer + MLP) layers
    assert [i for i, x in enumerate(mixers) if x.name == "based"] == based_at
    assert [i for i, x in enumerate(mixers) if x.name == "swa"] == swa_at
    assert all(x.kwargs == {"window": 129} for x in mixers if x.name == "swa")
    assert sum(x.name == "conv" for x in mixers) == n_layers - len(based_at) - len(swa_at)
    assert P(spec, n_blocks=4 * n_layers) == layers * 2


def test_whitespace_around_tokens():
    assert P(" based : linear ,\n( conv , mlp ) * 2 ,\tattn : heads = 4 ") == P("based:linear,(conv,mlp)*2,attn:4")


def test_registered_name_wins_over_digit_sugar():
    assert P("mamba2") == [L("mamba2")]
    assert P("mamba2:32") == [L("mamba2", (("d_state", 32),))]
    assert P("mamba264") == [L("mamba", (("d_state", 264),))]  # the trailing digit run is the arg
    assert parse_spec("mamba2", make_registry(without=("mamba2",))) == [L("mamba", (("d_state", 2),))]
    assert P("swa64:4") == P("swa:64:heads=4") == [L("swa", (("window", 64), ("heads", 4)))]


def test_args_are_typed_and_keyword_only_args_need_keywords():
    (layer,) = P("attn:8:rope_base=5e5:rotary_dim=32")
    assert layer.kwargs == {"heads": 8, "rotary_dim": 32, "rope_base": 500000.0}
    assert isinstance(layer.kwargs["rope_base"], float)
    assert [k for k, _ in layer.args] == ["heads", "rotary_dim", "rope_base"]  # declaration order
    assert P("mamba:fast_path=NO")[0].kwargs == {"fast_path": False}
    assert len({*P("based,based:auto,swa:128,swa")}) == 2  # hashable; explicit defaults compare equal


def test_make_layer():
    assert make_layer("swa", {"window": 64}, REG) == P("swa64")[0]
    assert make_layer("swa", {"window": 128, "heads": 4}, REG) == L("swa", (("heads", 4),))
    with pytest.raises(SpecError, match="window must be >= 1"):
        make_layer("swa", {"window": 0}, REG)
    with pytest.raises(KeyError, match="unknown mixer 'nope'"):
        make_layer("nope", {}, REG)


# -- errors: message and caret ---------------------------------------------------------------------
ERRORS = [
    # spec, expected substrings of str(error), caret column, caret length
    ("basd,swa", ["unknown mixer 'basd'", "did you mean 'based'", "Registered mixers: attn, based"], 0, 4),
    ("swa:-1", ["swa: window must be >= 1, got -1", "positional, in order: window"], 4, 2),
    ("based:feature_dim=x", ["based: feature_dim must be int, got 'x'"], 18, 1),
    ("(based,mlp", ["unclosed '('"], 0, 1),
    ("based,mlp)", ["unmatched ')'"], 9, 1),
    ("mlp*0", ["repeat count must be >= 1, got 0"], 4, 1),
    ("mlp*-1", ["repeat count must be a positive integer, got '-1'"], 4, 2),
    ("mlp*", ["repeat count must be a positive integer, got nothing"], 3, 1),
    ("mlp*2*3", ["expected ',' between layers, got '*'"], 5, 1),
    ("based,,mlp", ["empty item"], 6, 1),
    ("based,mlp,", ["trailing ','"], 9, 1),
    ("based,()", ["empty group"], 6, 2),
    ("", ["empty spec"], 0, 1),
    ("based mlp", ["expected ',' between layers, got 'mlp'"], 6, 3),
    ("based;mlp", ["unexpected character ';'"], 5, 1),
    ("64", ["expected a mixer name, got '64'"], 0, 2),
    ("swa:", ["expected an argument after ':'"], 3, 1),
    ("swa:window=", ["expected a value after 'window='"], 10, 1),
    ("swa0", ["swa: window must be >= 1, got 0"], 3, 1),
    ("based:fast", ["based: impl must be one of auto, quadratic"], 6, 4),
    ("attn:head=4", ["attn has no argument 'head'", "did you mean 'heads'"], 5, 4),
    ("attn:heads=2:4", ["attn: positional argument '4' after a keyword argument", "key=value"], 13, 1),
    ("conv:3:4", ["conv takes 1 positional argument (kernel_size); '4' is one too many",
                  "keyword only: expand"], 7, 1),
    ("mlp,conv:4:kernel_size=5", ["conv: kernel_size is given twice"], 11, 11),
    ("attn:rope_base=nan", ["attn: rope_base must be a finite number"], 15, 3),
    ("mlp*1000000", ["at most 4096"], 4, 7),
    ("mlp*100000", ["'*100000' expands to 100000 blocks; at most 4096"], 4, 6),
    ("mlp:99999999999999999999", ["mlp: hidden=99999999999999999999 does not fit in a 64-bit integer"], 4, 20),
]


@pytest.mark.parametrize("spec, needles, col, length", ERRORS)
def test_errors_have_message_and_caret(spec, needles, col, length):
    with pytest.raises(SpecError) as info:
        P(spec)
    err = info.value
    assert (err.pos, err.length, err.spec) == (col, length, spec)
    text = str(err)
    for needle in needles:
        assert needle.lower() in text.lower(), text
    lines = text.splitlines()
    assert lines[0] == err.message
    assert lines[1] == "  " + spec and lines[2] == "  " + " " * col + "^" * length


def test_tiling_error_names_both_numbers():
    spec = "based,swa,mlp,conv,mlp"
    with pytest.raises(SpecError) as info:
        P(spec, n_blocks=36)
    err = info.value
    assert err.message == "--layers 36 is not a multiple of the spec's 5 blocks"
    assert "35 or 40" in err.hint
    assert (err.pos, err.length) == (0, len(spec))
    assert str(err).splitlines()[2] == "  " + "^" * len(spec)
    with pytest.raises(SpecError, match="positive"):
        P(spec, n_blocks=0)


def test_missing_plugin_names_the_package():
    reg = make_registry(without=("swa",))
    with pytest.raises(SpecError) as info:
        parse_spec("based,swa64", reg)
    err = info.value
    assert err.message == "unknown mixer 'swa'" and (err.pos, err.length) == (6, 3)
    assert "pip install seqmix-plugin-swa" in err.hint and "Registered mixers" in err.hint


def test_long_and_multiline_specs_keep_the_caret_under_the_token():
    spec = BASED_1B.replace("swa:129,mlp,conv", "swa:129,mlp,cnov")
    with pytest.raises(SpecError) as info:
        P(spec)
    _, line, carets = str(info.value).splitlines()[:3]
    assert len(line) < 110 and line.strip().startswith("...")
    assert line[carets.index("^"):][:4] == "cnov" and carets.count("^") == 4
    with pytest.raises(SpecError) as info:
        P("based,\n  mlpp")
    _, line, carets = str(info.value).splitlines()[:3]
    assert line == "    mlpp" and carets == "    ^^^^"


def test_spec_error_is_a_picklable_value_error():
    with pytest.raises(ValueError) as info:
        P("basd")
    clone = pickle.loads(pickle.dumps(info.value))
    assert str(clone) == str(info.value) and clone.hint == info.value.hint


# -- canonical form --------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, canonical", [
    ("attn:heads=16:kv_heads=4,mlp", "attn:16:4,mlp"),
    ("attn:kv_heads=4", "attn:kv_heads=4"),
    ("attn:16:rotary_dim=32:kv_heads=4", "attn:16:4:rotary_dim=32"),
    ("based:impl=linear:heads=4", "based:linear:heads=4"),
    ("based:auto:16:2", "based:heads=2"),
    ("swa64", "swa:64"),
    ("(mlp)*2", "mlp,mlp"),
    ("mamba:fast_path=no:expand=3", "mamba:expand=3:fast_path=false"),
    ("attn:rope_base=500000", "attn:rope_base=500000.0"),
    ("based:eps=1e-6", "based:eps=1e-06"),
])
def test_canonical_form(spec, canonical):
    assert F(P(spec)) == canonical
    assert F(P(canonical)) == canonical


def test_format_canonicalises_hand_built_layers():
    assert F([L("swa", (("heads", 4), ("window", 128)))]) == "swa:heads=4"
    with pytest.raises(ValueError):
        F([])


@pytest.mark.parametrize("spec, n_blocks, compact", [
    ("based,swa64,mlp", 36, "(based,swa:64,mlp)*12"),
    ("mlp,mlp,mlp,conv", None, "mlp*3,conv"),
    ("conv,mlp,conv,mlp,based", None, "(conv,mlp)*2,based"),
    ("swa:1,swa:1,based,swa:1,swa:1,based", None, "(swa:1*2,based)*2"),
])
def test_compact_form(spec, n_blocks, compact):
    layers = P(spec, n_blocks=n_blocks)
    assert F(layers, compact=True) == compact
    assert P(compact) == layers


def test_compact_based_360m_reparses():
    layers = P(BASED_360M)
    compact = F(layers, compact=True)
    assert P(compact) == layers and len(compact) < len(F(layers)) // 3


# -- properties ------------------------------------------------------------------------------------
_TRUE, _FALSE = ["true", "True", "1", "yes"], ["false", "FALSE", "0", "no"]


def _values(arg: Arg) -> st.SearchStrategy:
    if arg.choices is not None:
        return st.sampled_from(arg.choices)
    if arg.type is bool:
        return st.booleans()
    if arg.type is int:
        lo = int(arg.min) if arg.min is not None else -1000
        return st.integers(lo, int(arg.max) if arg.max is not None else lo + 5000)
    if arg.type is float:
        return st.floats(arg.min, arg.max, allow_nan=False, allow_infinity=False)
    return st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True)


@st.composite
def given_args(draw, name: str) -> dict:
    """Some of the mixer's args, with values it accepts (defaults included, explicitly)."""
    return {a.name: draw(_values(a)) for a in CLASSES[name].spec_args if draw(st.booleans())}


def _expected(name: str, args: dict) -> LayerSpec:
    """The LayerSpec the parser must produce, written out independently of seqmix.spec."""
    keep = [(a.name, args[a.name]) for a in CLASSES[name].spec_args
            if a.name in args and args[a.name] != a.default]
    return LayerSpec(name, tuple(keep))


@st.composite
def layer_specs(draw) -> LayerSpec:
    name = draw(st.sampled_from(sorted(CLASSES)))
    return _expected(name, draw(given_args(name)))


@st.composite
def layer_lists(draw) -> list[LayerSpec]:
    pool = draw(st.lists(layer_specs(), min_size=1, max_size=4))  # a small pool, so repeats are common
    return draw(st.lists(st.sampled_from(pool), min_size=1, max_size=24))


@settings(max_examples=100, deadline=None)
@given(layer_lists())
def test_format_then_parse_round_trips(layers):
    text = F(layers)
    assert P(text) == layers
    assert F(P(text)) == text
    assert P(F(layers, compact=True)) == layers


def _value_text(draw, v) -> str:
    if isinstance(v, bool):
        return draw(st.sampled_from(_TRUE if v else _FALSE))
    if isinstance(v, float):
        return draw(st.sampled_from([repr(v), format(v, ".17g")]))
    return str(v)


@st.composite
def layer_text(draw) -> tuple[list[str], LayerSpec]:
    """Tokens of one layer in any accepted form (positional, keyword, NAME INT sugar), and its LayerSpec."""
    name = draw(st.sampled_from(sorted(CLASSES)))
    args = draw(given_args(name))
    decl = CLASSES[name].spec_args
    lead = 0
    for a in (a for a in decl if a.positional):
        if a.name not in args:
            break
        lead += 1
    n_pos = draw(st.integers(0, lead))
    positional = [a.name for a in decl if a.positional][:n_pos]
    keyword = draw(st.permutations([k for k in args if k not in positional]))
    tokens = [name]
    for k in positional:
        tokens += [":", _value_text(draw, args[k])]
    for k in keyword:
        tokens += [":", k, "=", _value_text(draw, args[k])]
    if n_pos and tokens[2].isdigit() and not name[-1].isdigit() and name + tokens[2] not in REG:
        if draw(st.booleans()):
            tokens[:3] = [name + tokens[2]]
    return tokens, _expected(name, args)


@st.composite
def spec_text(draw, depth: int = 0) -> tuple[list[str], list[LayerSpec]]:
    """Tokens of a spec with groups and repeats, and its expansion computed by hand."""
    tokens, layers = [], []
    for i in range(draw(st.integers(1, 3))):
        if i:
            tokens.append(",")
        if depth < 3 and draw(st.integers(0, 3)) == 0:
            toks, expanded = draw(spec_text(depth + 1))
            toks = ["(", *toks, ")"]
        else:
            toks, layer = draw(layer_text())
            expanded = [layer]
        if draw(st.booleans()):
            n = draw(st.integers(1, 3))
            toks, expanded = [*toks, "*", str(n)], expanded * n
        tokens += toks
        layers += expanded
    return tokens, layers


@settings(max_examples=120, deadline=None)
@given(spec_text(), st.data())
def test_parse_matches_hand_expansion_and_round_trips(tokens_and_layers, data):
    tokens, expected = tokens_and_layers
    gaps = data.draw(st.lists(st.sampled_from(["", "", " ", "\n "]), min_size=len(tokens) + 1,
                              max_size=len(tokens) + 1))
    text = "".join(g + t for g, t in zip(gaps, tokens)) + gaps[-1]
    layers = P(text)
    assert layers == expected
    canonical = F(layers)
    assert P(canonical) == layers and F(P(canonical)) == canonical
    assert P(F(layers, compact=True)) == layers


class _CountingStr(str):
    """A layer word that counts how often the compact folding compares it."""

    compares = 0

    def __eq__(self, other):
        _CountingStr.compares += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


@pytest.mark.parametrize("items, folded", [(["mlp"] * 3000, ["mlp*3000"]),
                                           (["conv", "mlp"] * 1500, ["(conv,mlp)*1500"]),
                                           (["a", "b", "c"] * 999 + ["a"], ["(a,b,c)*999", "a"])])
def test_compact_folding_of_a_long_repetition_takes_linear_work(items, folded):
    from seqmix.spec import _fold

    _CountingStr.compares = 0
    assert _fold([_CountingStr(w) for w in items]) == folded
    assert _CountingStr.compares < 10 * len(items)  # the greedy search used to compare ~n^2 / 2 pairs
