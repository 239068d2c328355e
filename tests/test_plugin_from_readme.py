"""A plugin written from the README alone: its three code blocks, installed as a distribution in a temporary
folder (a .dist-info with the entry point, on sys.path), load through the registry and pass conformance."""
import re
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch

from seqmix.registry import load_registry
from seqmix.testing import check_mixer_conformance, check_model_conformance

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_plugin_blocks() -> dict[str, str]:
    """{first-line path comment: block text} of the fenced blocks in "Writing a mixer plugin"."""
    text = README.read_text()
    section = text[text.index("## Writing a mixer plugin"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```(?:toml|python)\n(.*?)```", section, flags=re.S)
    return {b.splitlines()[0].lstrip("# ").strip(): b for b in blocks if b.startswith("# ")}


@pytest.fixture
def readme_plugin(tmp_path, monkeypatch):
    blocks = readme_plugin_blocks()
    assert set(blocks) == {"pyproject.toml", "my_mixer/plugin.py", "my_mixer/mixer.py"}, list(blocks)
    (tmp_path / "my_mixer").mkdir()
    (tmp_path / "my_mixer" / "__init__.py").write_text("")
    for path in ("my_mixer/plugin.py", "my_mixer/mixer.py"):
        (tmp_path / path).write_text(blocks[path])
    eps = tomllib.loads(blocks["pyproject.toml"])["project"]["entry-points"]["seqmix"]
    info = tmp_path / "my_mixer-0.1.dist-info"  # what pip would write for the distribution
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-mixer\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[seqmix]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for mod in [m for m in sys.modules if m == "my_mixer" or m.startswith("my_mixer.")]:
        del sys.modules[mod]


def test_the_readme_plugin_registers_and_passes_conformance(readme_plugin):
    reg = load_registry()
    assert not reg.problems, reg.problems
    entry = reg.mixers["ema"]
    assert (entry.dist, entry.plugin) == ("my-mixer", "ema")
    m = check_mixer_conformance("ema:0.8", registry=reg)  # loop vs parallel included (check_views_agree)
    assert m.impl == "parallel" and m.args == {"decay": 0.8, "impl": "auto"}
    check_mixer_conformance("ema:impl=loop", registry=reg, T=20)
    check_model_conformance("ema,mlp,ema:0.5", registry=reg)
    model = check_model_conformance("ema,attn", registry=reg)
    new = model.generate([[1, 2, 3], [4, 5]], max_new_tokens=3, temperature=0)
    assert new.shape == (2, 3)


def test_a_declared_arg_that_init_does_not_take_is_reported_at_registration(tmp_path, monkeypatch):
    (tmp_path / "bad_arg_plugin.py").write_text(textwrap.dedent('''
        from seqmix import Arg, hookimpl
        from seqmix.builtins.mlp import SwiGLU

        class WideMLP(SwiGLU):
            name = "wide_mlp"
            spec_args = SwiGLU.spec_args + (Arg("mult", int, 4),)  # SwiGLU.__init__ has no `mult`

        @hookimpl
        def seqmix_register_mixers(register):
            register(WideMLP)
    '''))
    info = tmp_path / "bad_arg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bad-arg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[seqmix]\nbad_arg = bad_arg_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = load_registry()
    assert "wide_mlp" not in reg and {"based", "mlp"} <= set(reg.names())
    (problem,) = [p for p in reg.problems if p.plugin == "bad_arg"]
    assert "mixer 'wide_mlp'" in problem.message and "does not accept the declared arg 'mult'" in problem.message
    sys.modules.pop("bad_arg_plugin", None)
