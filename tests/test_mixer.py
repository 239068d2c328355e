"""The Mixer base's bookkeeping: args bound and validated once, one implementation table resolved per device
(logged once, re-resolved on moves), registration checks; and the public face of `import seqmix`."""
import logging
import subprocess
import sys

import pytest
import torch

import seqmix
from seqmix.builtins.conv import BaseConv
from seqmix.builtins.mlp import SwiGLU
from seqmix.mixer import Arg, ArgError, BlockContext, Impl, Mixer, validate_mixer_class

CTX = BlockContext(d_model=16, n_heads=2, layer_idx=5)


def test_the_base_binds_validates_and_keeps_every_declared_arg():
    m = BaseConv(CTX, 4)  # positional args bind in declaration order
    assert m.args == {"kernel_size": 4, "expand": 2, "impl": "auto"} and m.kernel_size == 4
    assert BaseConv(CTX, kernel_size="5", expand=3).args["kernel_size"] == 5  # spec text converts
    assert SwiGLU(CTX).args == {"hidden": None}  # None: "inherit from the model"
    with pytest.raises(TypeError, match="mixer 'conv' has no arg 'taps'; its args: kernel_size, expand, impl"):
        BaseConv(CTX, taps=3)
    with pytest.raises(TypeError, match="takes 3 args"):
        BaseConv(CTX, 3, 2, "auto", 1)
    with pytest.raises(ArgError, match="kernel_size must be >= 2, got 1"):
        BaseConv(CTX, kernel_size=1)


def test_auto_is_chosen_once_logged_once_and_a_move_keeps_it_on_the_same_device(caplog):
    with caplog.at_level(logging.DEBUG, logger="seqmix.mixer"):
        m = BaseConv(CTX)
        m(torch.randn(1, 3, 16))
        m.to(torch.float64)  # a move that changes no device: nothing to re-resolve, nothing logged
        m(torch.randn(1, 3, 16, dtype=torch.float64))
    assert [r.getMessage() for r in caplog.records] == ["conv layer 5: impl=reference (asked auto)"]
    assert m.impl == "reference" and m.ops["impl"][0].__name__ == "short_conv_ref"


def test_a_move_re_resolves_auto_but_never_a_named_implementation(monkeypatch):
    import triton  # noqa: F401  (make install-test installs it)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine that sees a GPU
    auto, named = BaseConv(CTX), BaseConv(CTX, impl="triton")
    assert (auto.impl, named.impl) == ("reference", "triton")  # auto follows the layer's device (CPU)
    auto.select_impls("cuda")  # what a move to a GPU does
    named.select_impls("cpu")
    assert (auto.impl, named.impl) == ("triton", "triton")
    assert auto.ops["impl"][0].__module__ == "seqmix_kernels.short_conv.triton"
    auto.cpu()
    assert auto.impl == "reference"


def _mixer(name="toy", impls=None, args=(), init=None):
    body = {"name": name, "spec_args": args, "__init__": init or (lambda self, ctx, **kw: Mixer.__init__(self, ctx))}
    if impls is not None:
        body["impls"] = impls
    return type("Toy", (Mixer,), body)


@pytest.mark.parametrize("cls,match", [
    (_mixer(args=(Arg("width", int, 4),), init=lambda self, ctx: Mixer.__init__(self, ctx)),
     r"mixer 'toy' \(.*Toy\): __init__ does not accept the declared arg 'width'"),
    (_mixer(impls={"a": Impl("reference"), "b": Impl("reference")}), "exactly one Impl\\(role='reference'\\)"),
    (_mixer(impls={"a": Impl("fast")}), "roles must be one of"),
    (_mixer(impls={"ref": Impl("reference"), "k": Impl("kernel")},
            args=(Arg("impl", str, "auto", choices=("auto", "ref")),)), "must be \\('auto', 'ref', 'k'\\)"),
])
def test_registration_checks_name_the_mixer_and_what_is_wrong(cls, match):
    with pytest.raises(TypeError, match=match):
        validate_mixer_class(cls)
    with pytest.raises(TypeError, match=match):  # direct construction runs the same checks
        cls(CTX)


def test_a_kernel_that_cannot_run_says_what_is_missing(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("checks a CPU-only machine")
    with pytest.raises(RuntimeError, match=r"conv impl='triton' cannot run on this machine \(cpu\): the Triton "
                                           r"kernels need a CUDA device.*Use one of: auto, reference\."):
        BaseConv(CTX, impl="triton")


def test_import_seqmix_is_cheap_and_the_public_face_works(tmp_path):
    code = f"""
import sys
import seqmix
assert not {{'torch', 'transformers', 'triton'}} & set(sys.modules), sorted(sys.modules)
model = seqmix.build("conv,mlp", d_model=16, n_heads=2, vocab_size=64)
seqmix.save(model, {str(tmp_path / 'm')!r})
again = seqmix.load({str(tmp_path / 'm')!r})
import torch
ids = torch.randint(0, 64, (2, 7))
assert torch.equal(model(ids), again(ids))
assert seqmix.format_spec(seqmix.parse_spec("(conv,mlp)*2")) == "conv,mlp,conv,mlp"
assert not {{'transformers', 'triton'}} & set(sys.modules)
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert seqmix.Mixer is Mixer and seqmix.Arg is Arg and seqmix.hookimpl is not None
    assert set(seqmix.__all__) >= {"build", "load", "save", "parse_spec", "format_spec", "Mixer", "Arg", "hookimpl"}
