"""seqmix.io: a plugin brings a checkpoint format through `seqmix_register_importers` (its mixer renaming its own
tensors with `import_weights`), `load` dispatches to it, and the one strict loader names what does not fit."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from seqmix.cli import main
from seqmix.io import ConversionError, load
from seqmix.io.importers.common import LayerTensors
from seqmix.model import build_model
from seqmix.registry import load_registry
from test_registry import _fake_dist

TOY_PLUGIN = """
    from seqmix.builtins.mlp import SwiGLU
    from seqmix.config import ModelConfig
    from seqmix.hookspecs import hookimpl
    from seqmix.io import read_weights
    from seqmix.io.importers.common import Layout, import_checkpoint


    class ToyMLP(SwiGLU):
        name = "toymlp"

        @classmethod
        def import_weights(cls, source, tensors):
            if source != "toy":
                return super().import_weights(source, tensors)
            return {"fc1.weight": tensors["w_in"], "fc2.weight": tensors["w_out"].t()}  # stored transposed


    def import_toy(directory, cfg, registry):
        n = cfg["n_layers"]
        config = ModelConfig(spec=",".join(["toymlp"] * n), d_model=cfg["width"], n_heads=1,
                             vocab_size=cfg["vocab"], pad_vocab_multiple=1)
        layout = Layout(embed="emb", names={"norm_f.weight": "final_norm"} | {
            f"blocks.{i}.norm.weight": f"l{i}.norm" for i in range(n)}, mixers={i: f"l{i}.ff." for i in range(n)})
        return import_checkpoint(config, read_weights(directory), layout, source="toy", what="toy checkpoint",
                                 registry=registry)


    @hookimpl
    def seqmix_register_mixers(register):
        register(ToyMLP)


    @hookimpl
    def seqmix_register_importers(register):
        register("toy", import_toy)
        register("llama", import_toy)  # taken by the built-in importer: reported, the first one stays
"""


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    _fake_dist(tmp_path, "fake-toy-format", {"zz_toy": "fake_toy_format_plugin"},
               {"fake_toy_format_plugin": TOY_PLUGIN})
    monkeypatch.syspath_prepend(str(tmp_path))
    return load_registry()


def write_toy(path, model, extra=None, drop=()):
    """`model`'s weights in the toy format's own names and layout."""
    sd = model.state_dict()
    n = len(model.blocks)
    toy = {"emb": sd["embed.weight"], "final_norm": sd["norm_f.weight"]}
    for i in range(n):
        toy |= {f"l{i}.norm": sd[f"blocks.{i}.norm.weight"], f"l{i}.ff.w_in": sd[f"blocks.{i}.mixer.fc1.weight"],
                f"l{i}.ff.w_out": sd[f"blocks.{i}.mixer.fc2.weight"].t().contiguous()}
    toy = {k: v for k, v in (toy | (extra or {})).items() if k not in drop}
    path.mkdir()
    save_file(toy, str(path / "model.safetensors"))
    cfg = {"model_type": "toy", "n_layers": n, "width": model.config.d_model, "vocab": model.config.vocab_size}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def toy_model(registry):
    from seqmix.config import ModelConfig

    torch.manual_seed(0)
    return build_model(ModelConfig(spec="toymlp,toymlp", d_model=16, n_heads=1, vocab_size=40,
                                   pad_vocab_multiple=1), registry=registry)


def test_a_plugin_brings_a_checkpoint_format_that_load_and_convert_read(toy_plugin, tmp_path):
    reg = toy_plugin
    assert reg.importers["toy"].dist == "fake-toy-format" and reg.importers["llama"].dist == "seqmix"
    assert any("'llama'" in p.message and p.dist == "fake-toy-format" for p in reg.problems), reg.problems
    model = toy_model(reg)
    src = write_toy(tmp_path / "toy", model)
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load(src)(tokens), model(tokens))
        r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out")])
        assert r.exit_code == 0, r.output
        assert torch.equal(load(tmp_path / "out")(tokens), model(tokens))
    out = CliRunner().invoke(main, ["plugins", "--json"]).output
    assert {"model_type": "toy", "plugin": "zz_toy", "dist": "fake-toy-format"} in json.loads(out)["importers"]


def test_foreign_names_of_missing_unexpected_and_misshapen_tensors(toy_plugin, tmp_path):
    model = toy_model(toy_plugin)
    bad = write_toy(tmp_path / "bad", model, extra={"l0.ff.bias": torch.zeros(3), "l1.norm": torch.ones(5)},
                    drop=("l1.ff.w_out", "final_norm"))
    with pytest.raises(ConversionError) as e:
        load(bad)
    msg = str(e.value)
    assert "l1.ff.w_out (-> blocks.1.mixer.*, a 'toymlp' layer)" in msg  # the mixer's read of it failed
    assert "final_norm (-> norm_f.weight)" in msg
    assert "unexpected keys: ['l0.ff.bias']" in msg
    assert "l1.norm: checkpoint [5] vs seqmix blocks.1.norm.weight [16]" in msg
    odd = write_toy(tmp_path / "odd", model, extra={"l1.ff.w_out": torch.zeros(2, 2, 2)})  # .t() fails in 3-D
    with pytest.raises(ConversionError, match=r"l1\.ff\.\* \(a 'toymlp' layer\): RuntimeError"):
        load(odd)


def test_a_format_no_importer_reads_names_the_registered_ones(tmp_path):
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt/config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ConversionError, match=r"'gpt_neox'.*registered: based-repo, llama, mamba"):
        load(tmp_path / "gpt")
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "gpt"), str(tmp_path / "out")])
    assert r.exit_code == 2 and "gpt_neox" in r.output and "Traceback" not in r.output


def test_layer_tensors_record_reads_and_raise_key_error_for_missing_names():
    view = LayerTensors({"a": torch.zeros(1), "b": torch.ones(1)})
    assert "a" in view and view.read == set()  # a membership test is not a read
    assert view["a"].item() == 0 and view.get("zz") is None
    with pytest.raises(KeyError):
        view["zz"]
    assert view.read == {"a"}
