"""The spec language: parse `based,swa:64,(conv,mlp)*3` into a flat list of `LayerSpec`s and write it back.

Grammar (DESIGN.md §2); whitespace is allowed around every token:

    spec   := item ("," item)*
    item   := unit ["*" INT]                 # repetition, INT >= 1
    unit   := layer | "(" spec ")"
    layer  := NAME [INT] (":" arg)*          # "swa64" is sugar for "swa:64"; a registered name wins ("mamba2")
    arg    := VALUE | KEY "=" VALUE          # positional args bind in the order the mixer declares

Decisions the grammar leaves open:
  * `NAME INT` sugar: if the whole word is a registered mixer it is that mixer ("mamba2"). Otherwise its
    trailing run of digits is the first positional arg ("swa64" -> swa:64, "mamba264" -> mamba:264; write
    "mamba2:64" for the other reading).
  * Positional args bind to the mixer's positional `Arg`s in declaration order; keyword-only args
    (`Arg(positional=False)`) must be given as `key=value`. As in Python, a positional arg after a keyword
    arg is an error, and so is giving one arg twice.
  * Values go through `Arg.convert` (type, choices, range); float args must also be finite, so that a
    `LayerSpec` always equals itself. A VALUE is a word of letters, digits and `_ . + -`.
  * Integer values must fit in 64 bits.
  * A spec may expand to at most `MAX_BLOCKS` blocks and nest groups at most `MAX_DEPTH` deep.

`LayerSpec.args` holds only the args that differ from the declared default, in declaration order, so two
specs that build the same model parse to equal lists (`mamba:d_state=16` == `mamba` when 16 is the default).

Canonical form (`format_spec`), stored in saved model configs:
  * one layer per item, joined by "," with no spaces, no groups, no repetition, no `NAME INT` sugar;
  * per layer: the name, then the leading run of declared positional args that are set, as `:value`, then
    every other set arg as `:key=value`, in declaration order (`attn:16:4`, `based:linear:heads=4`);
  * bools as `true`/`false`, floats via `repr`, ints and strings as they are.
`parse_spec(format_spec(x)) == x`, and `format_spec` of a parsed spec is idempotent. `compact=True` folds
repeats greedily into `X*n` and `(A,B)*n` for display; it parses back to the same list.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from seqmix.mixer import Arg, ArgError
from seqmix.registry import KNOWN_PLUGINS, Registry, load_registry

__all__ = ["LayerSpec", "SpecError", "parse_spec", "format_spec", "make_layer", "MAX_BLOCKS", "MAX_DEPTH"]

# A typo like `mlp*100000` is an error, not minutes of building: the deepest published models have a few
# hundred blocks, and building (even on the meta device) costs milliseconds per block.
MAX_BLOCKS = 4096
MAX_DEPTH = 32  # group nesting

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SUGAR = re.compile(r"([A-Za-z_][A-Za-z0-9_]*?)([0-9]+)")  # shortest name, longest trailing digit run
_WORD = re.compile(r"[A-Za-z0-9_.+\-]+")
_PUNCT = ",()*:="
_SHOW_WIDTH = 96  # longer spec lines are shown as a window around the caret
_INT64 = (-(1 << 63), (1 << 63) - 1)
_FOLD_PERIOD = 64  # the longest repeated group the compact form looks for


@dataclass(frozen=True)
class LayerSpec:
    """One block of the model: a registered mixer name and its non-default args, in declaration order."""

    name: str
    args: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        """The args as keywords for the mixer's constructor: `cls(ctx, **layer.kwargs)`."""
        return dict(self.args)


class SpecError(ValueError):
    """A spec that does not parse or validate; `str()` shows the spec with a caret under the bad token."""

    def __init__(self, message: str, spec: str, pos: int, length: int = 1, hint: Optional[str] = None):
        super().__init__(message, spec, pos, length, hint)  # all of them, so the error pickles
        self.message, self.spec, self.pos, self.length, self.hint = message, spec, pos, max(1, length), hint

    def __str__(self) -> str:
        start = self.spec.rfind("\n", 0, self.pos) + 1
        end = self.spec.find("\n", self.pos)
        line = self.spec[start : len(self.spec) if end < 0 else end].replace("\t", " ").replace("\r", " ")
        col = self.pos - start
        width = max(1, min(self.length, len(line) - col))
        if len(line) > _SHOW_WIDTH:  # a window around the token, so the caret stays under it
            lo = max(0, min(col - _SHOW_WIDTH // 3, len(line) - _SHOW_WIDTH))
            head = "..." if lo else ""
            tail = "..." if lo + _SHOW_WIDTH < len(line) else ""
            width = max(1, min(width, _SHOW_WIDTH - (col - lo)))
            line, col = head + line[lo : lo + _SHOW_WIDTH] + tail, col - lo + len(head)
        out = [self.message, "  " + line, "  " + " " * col + "^" * width]
        if self.hint:
            out.append(self.hint)
        return "\n".join(out)


# -- tokens -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tok:
    kind: str  # "word", one of _PUNCT, or "end"
    text: str
    pos: int


def _tokenize(text: str) -> list[_Tok]:
    toks, i = [], 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif c in _PUNCT:
            toks.append(_Tok(c, c, i))
            i += 1
        elif m := _WORD.match(text, i):
            toks.append(_Tok("word", m.group(), i))
            i = m.end()
        else:
            raise SpecError(f"unexpected character {c!r} in spec", text, i,
                            hint="names and values use letters, digits and _ . + -; "
                                 "layers are separated by ',', args by ':'")
    toks.append(_Tok("end", "", len(text)))
    return toks


# -- parsing ------------------------------------------------------------------------------------------
_GRAMMAR_HINT = "a spec is comma-separated layers, e.g. 'based:linear,swa:64,(conv,mlp)*3'"


class _Parser:
    def __init__(self, text: str, registry: Registry):
        self.text, self.reg = text, registry
        self.toks, self.i = _tokenize(text), 0

    def error(self, message: str, pos: int, length: int = 1, hint: Optional[str] = _GRAMMAR_HINT):
        return SpecError(message, self.text, pos, length, hint)

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def parse(self) -> list[LayerSpec]:
        if self.peek().kind == "end":
            raise self.error("empty spec", 0)
        layers = self.seq(depth=0)
        tok = self.peek()
        if tok.kind == ")":
            raise self.error("unmatched ')'", tok.pos)
        if tok.kind != "end":
            raise self.error(f"expected ',' between layers, got {tok.text!r}", tok.pos, len(tok.text))
        return layers

    def seq(self, depth: int) -> list[LayerSpec]:
        layers = self.item(depth)
        while self.peek().kind == ",":
            self.take()
            layers.extend(self.item(depth))
            if len(layers) > MAX_BLOCKS:
                raise self.error(f"spec expands to more than {MAX_BLOCKS} blocks", 0, len(self.text), None)
        return layers

    def item(self, depth: int) -> list[LayerSpec]:
        tok = self.peek()
        prev = self.toks[self.i - 1] if self.i else None
        if tok.kind == "(":
            if depth >= MAX_DEPTH:
                raise self.error(f"groups nested more than {MAX_DEPTH} deep", tok.pos)
            self.take()
            if self.peek().kind == ")":
                raise self.error("empty group '()'", tok.pos, 2 if self.peek().pos == tok.pos + 1 else 1)
            unit = self.seq(depth + 1)
            close = self.take()
            if close.kind == "end":
                raise self.error("unclosed '(': add the matching ')'", tok.pos)
            if close.kind != ")":
                raise self.error(f"expected ',' or ')', got {close.text!r}", close.pos, len(close.text))
        elif tok.kind == "word":
            unit = [self.layer()]
        elif prev is not None and prev.kind == "," and tok.kind == ",":
            raise self.error("empty item: remove the extra ','", tok.pos)
        elif prev is not None and prev.kind == ",":
            raise self.error("trailing ','", prev.pos)
        else:
            got = "the end of the spec" if tok.kind == "end" else repr(tok.text)
            raise self.error(f"expected a mixer name or '(', got {got}", tok.pos)
        if self.peek().kind != "*":
            return unit
        star, count = self.take(), self.take()
        if count.kind != "word" or not count.text.isdigit():
            got = "nothing" if count.kind == "end" else repr(count.text)
            raise self.error(f"repeat count must be a positive integer, got {got}",
                             count.pos if count.kind == "word" else star.pos, len(count.text))
        n = int(count.text)
        if n < 1:
            raise self.error(f"repeat count must be >= 1, got {n}", count.pos, len(count.text),
                             "to leave a layer out, delete it from the spec")
        if len(unit) * n > MAX_BLOCKS:
            raise self.error(f"'*{n}' expands to {len(unit) * n} blocks; at most {MAX_BLOCKS} are allowed",
                             count.pos, len(count.text), None)
        return unit * n

    def layer(self) -> LayerSpec:
        tok = self.take()
        word, raw = tok.text, []  # raw: (key or None, key_pos, value text, value pos)
        if not _NAME.fullmatch(word):
            raise self.error(f"expected a mixer name, got {word!r}", tok.pos, len(word))
        name, m = word, _SUGAR.fullmatch(word)
        if name not in self.reg and m is not None and m.group(1) in self.reg:
            name = m.group(1)
            raw.append((None, -1, m.group(2), tok.pos + len(name)))
        if name not in self.reg:
            known = m is not None and m.group(1) in KNOWN_PLUGINS
            bad = m.group(1) if known else word
            message, _, hint = self.reg.unknown_message(bad).partition("\n")
            raise self.error(message.rstrip("."), tok.pos, len(bad), hint or None)
        while self.peek().kind == ":":
            colon, val = self.take(), self.take()
            if val.kind != "word":
                raise self.error(f"expected an argument after ':' in {name!r}", colon.pos, 1,
                                 _args_hint(name, self.reg.get(name)))
            if self.peek().kind != "=":
                raw.append((None, -1, val.text, val.pos))
                continue
            key, eq, val = val, self.take(), self.take()
            if not _NAME.fullmatch(key.text):
                raise self.error(f"invalid argument name {key.text!r}", key.pos, len(key.text))
            if val.kind != "word":
                raise self.error(f"expected a value after '{key.text}='", eq.pos)
            raw.append((key.text, key.pos, val.text, val.pos))
        try:
            return _bind(name, self.reg.get(name), raw)
        except _BindError as e:
            raise self.error(e.message, e.pos, e.length, e.hint) from None


class _BindError(Exception):
    def __init__(self, message: str, pos: int, length: int, hint: Optional[str]):
        super().__init__(message)
        self.message, self.pos, self.length, self.hint = message, pos, length, hint


def _bind(name: str, cls: type, raw: Sequence[tuple[Optional[str], int, Any, int]]) -> LayerSpec:
    """Bind raw (key, key_pos, value, value_pos) args to `cls.spec_args`; positions are for the caret."""
    decl: tuple[Arg, ...] = cls.spec_args
    by_name = {a.name: a for a in decl}
    positional = [a for a in decl if a.positional]
    hint = _args_hint(name, cls)
    given: dict[str, Any] = {}
    n_pos, keyword_seen = 0, False
    for key, key_pos, value, pos in raw:
        length = len(str(value))
        if key is None:
            if keyword_seen:
                raise _BindError(f"{name}: positional argument {value!r} after a keyword argument",
                                 pos, length, "write it as key=value; " + hint)
            if n_pos >= len(positional):
                n = len(positional)
                takes = f"{n} positional argument{'' if n == 1 else 's'}" + (
                    f" ({', '.join(a.name for a in positional)})" if n else "")
                raise _BindError(f"{name} takes {takes}; {value!r} is one too many", pos, length, hint)
            arg, n_pos = positional[n_pos], n_pos + 1
        else:
            keyword_seen = True
            if key not in by_name:
                close = difflib.get_close_matches(key, list(by_name), n=1)
                did = f"did you mean {close[0]!r}? " if close else ""
                raise _BindError(f"{name} has no argument {key!r}", key_pos, len(key), did + hint)
            arg = by_name[key]
        if arg.name in given:
            at = pos if key is None else key_pos
            raise _BindError(f"{name}: {arg.name} is given twice", at, len(key or str(value)), hint)
        try:
            v = arg.convert(value)
        except ArgError as e:
            raise _BindError(f"{name}: {e}", pos, length, hint) from None
        if isinstance(v, int) and not isinstance(v, bool) and not _INT64[0] <= v <= _INT64[1]:
            raise _BindError(f"{name}: {arg.name}={value} does not fit in a 64-bit integer", pos, length, hint)
        if isinstance(v, float) and not math.isfinite(v):
            raise _BindError(f"{name}: {arg.name} must be a finite number, got {value!r}", pos, length, hint)
        given[arg.name] = v
    args = tuple((a.name, given[a.name]) for a in decl if a.name in given and not _is_default(a, given[a.name]))
    return LayerSpec(name, args)


def _is_default(arg: Arg, value: Any) -> bool:
    return arg.default is not None and value == arg.default  # converted values: True never meets an int


def _args_hint(name: str, cls: type) -> str:
    pos = [a.describe() for a in cls.spec_args if a.positional]
    kw = [a.describe() for a in cls.spec_args if not a.positional]
    if not pos and not kw:
        return f"{name} takes no arguments"
    parts = [f"positional, in order: {', '.join(pos)}"] if pos else []
    parts += [f"keyword only: {', '.join(kw)}"] if kw else []
    return f"{name} args (name:type=default): " + "; ".join(parts)


def _registry(registry: Optional[Registry]) -> Registry:
    return load_registry() if registry is None else registry


# -- public API ---------------------------------------------------------------------------------------
def parse_spec(text: str, registry: Optional[Registry] = None, *, n_blocks: Optional[int] = None
               ) -> list[LayerSpec]:
    """Parse a spec into one `LayerSpec` per block, groups and repetition expanded.

    `registry` defaults to `seqmix.registry.load_registry()`. `n_blocks` (the CLI's `--layers N`) tiles the
    spec to N blocks; N must be a multiple of the spec's length. Raises `SpecError` (with a caret) on any
    syntax error, unknown mixer or invalid arg.
    """
    layers = _Parser(text, _registry(registry)).parse()
    if n_blocks is None:
        return layers
    n = len(layers)
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1:
        raise SpecError(f"--layers must be a positive integer, got {n_blocks!r}", text, 0, len(text),
                        f"the spec alone has {n} blocks")
    if n_blocks % n:
        lo, hi = n * (n_blocks // n), n * (n_blocks // n + 1)
        nearest = f"{lo} or {hi}" if lo else f"{hi}"
        raise SpecError(f"--layers {n_blocks} is not a multiple of the spec's {n} blocks", text, 0, len(text),
                        f"use a multiple of {n} (e.g. {nearest}), or change the spec")
    if n_blocks > MAX_BLOCKS:
        raise SpecError(f"--layers {n_blocks} is more than {MAX_BLOCKS} blocks", text, 0, len(text))
    return layers * (n_blocks // n)


def make_layer(name: str, args: Optional[Mapping[str, Any]] = None, registry: Optional[Registry] = None
               ) -> LayerSpec:
    """A canonical `LayerSpec` from Python values: `make_layer("swa", {"window": 129})` == parse of `swa:129`.

    Args are validated like spec text; defaults are dropped. Raises `ValueError` (`SpecError` or the
    registry's `UnknownMixerError`, a `KeyError`) when the name or an arg is not accepted.
    """
    cls = _registry(registry).get(name)
    try:
        return _bind(name, cls, [(k, 0, v, 0) for k, v in (args or {}).items()])
    except _BindError as e:
        raise SpecError(e.message, name, 0, len(name), e.hint) from None


def format_spec(layers: Sequence[LayerSpec], registry: Optional[Registry] = None, *,
                compact: bool = False) -> str:
    """The canonical spec of `layers` (see the module docstring); `compact=True` folds repeats for display.

    Each layer is re-validated and canonicalised against its mixer's declared args first, so hand-built
    `LayerSpec`s with default values or args out of order still give the canonical form.
    """
    if not layers:
        raise ValueError("format_spec needs at least one layer")
    reg = _registry(registry)
    words: dict[LayerSpec, str] = {}
    for layer in layers:
        if layer not in words:
            words[layer] = _format_layer(make_layer(layer.name, dict(layer.args), reg), reg.get(layer.name))
    items = [words[layer] for layer in layers]
    return ",".join(_fold(items) if compact else items)


def _format_layer(layer: LayerSpec, cls: type) -> str:
    given = layer.kwargs
    out, leading = [layer.name], True
    for arg in cls.spec_args:
        if arg.name not in given:
            leading = leading and not arg.positional
            continue
        text = _format_value(layer.name, arg, given[arg.name])
        leading = leading and arg.positional
        out.append(text if leading else f"{arg.name}={text}")
    return ":".join(out)


def _format_value(name: str, arg: Arg, v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    text = repr(v) if isinstance(v, float) else str(v)
    if not _WORD.fullmatch(text):
        raise ValueError(f"{name}: {arg.name}={v!r} cannot be written in a spec (values are words of "
                         f"letters, digits and _ . + -)")
    return text


def _fold(items: list[str]) -> list[str]:
    """Greedy run-length folding: at each position take the period (of at most `_FOLD_PERIOD` items) whose
    repeats cover the most items. A period that cannot beat the best cover so far is not tried, so a long
    repetition (`mlp*100000`) folds in linear time."""
    out, i, n = [], 0, len(items)
    while i < n:
        best_p, best_k = 1, 1
        for p in range(1, min(_FOLD_PERIOD, (n - i) // 2) + 1):
            if (n - i) // p * p <= best_p * best_k:
                continue
            run = 0
            while i + run + p < n and items[i + run] == items[i + run + p]:
                run += 1
            k = 1 + run // p
            if k >= 2 and p * k > best_p * best_k:
                best_p, best_k = p, k
        body = _fold(items[i : i + best_p]) if best_p > 1 else items[i : i + 1]
        if best_k == 1:
            out.append(body[0])
        else:
            group = len(body) > 1 or "*" in body[0]  # `X*2*3` is not in the grammar
            out.append((f"({','.join(body)})" if group else body[0]) + f"*{best_k}")
        i += best_p * best_k
    return out
