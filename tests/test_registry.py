"""Registry: built-ins through the hook, entry points one at a time, broken and duplicate plugins reported."""
import textwrap

import pytest

from seqmix.registry import get_plugin_manager, load_registry

SIX = {"based", "swa", "attn", "mamba", "conv", "mlp"}


def test_all_six_mixers_registered_with_their_distributions():
    reg = load_registry()
    assert SIX <= set(reg.names()), reg.problems
    assert reg.mixers["mlp"].dist == "seqmix" and reg.mixers["conv"].plugin == "builtin"
    assert reg.mixers["based"].dist == "seqmix-plugin-based"
    assert reg.mixers["attn"].dist == "seqmix-plugin-attention"
    assert not reg.problems


def test_factory_builds_a_fresh_manager_each_call():
    assert get_plugin_manager() is not get_plugin_manager()


def test_builtins_only_when_entry_points_are_not_loaded():
    reg = load_registry(load_entry_points=False)
    assert set(reg.names()) == {"conv", "mlp"}
    msg = reg.unknown_message("based")
    assert "pip install seqmix-plugin-based" in msg and "plugins/based" in msg


def _fake_dist(tmp_path, name, entry_points, modules):
    """A distribution on sys.path made of a .dist-info folder and plain modules."""
    info = tmp_path / f"{name.replace('-', '_')}-0.1.dist-info"  # as pip names it
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[seqmix]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for mod, src in modules.items():
        (tmp_path / f"{mod}.py").write_text(textwrap.dedent(src))


def test_broken_and_duplicate_plugins_do_not_break_the_others(tmp_path, monkeypatch):
    _fake_dist(tmp_path, "fake-broken", {"zz_broken": "module_that_does_not_exist_123"}, {})
    _fake_dist(tmp_path, "fake-dup", {"zz_dup": "fake_dup_plugin"}, {"fake_dup_plugin": """
        from seqmix.hookspecs import hookimpl
        from seqmix.builtins.mlp import SwiGLU

        class OtherMLP(SwiGLU):
            name = "mlp"

        @hookimpl
        def seqmix_register_mixers(register):
            register(OtherMLP)
    """})
    _fake_dist(tmp_path, "fake-raiser", {"zz_raiser": "fake_raiser_plugin"}, {"fake_raiser_plugin": """
        from seqmix.hookspecs import hookimpl

        @hookimpl
        def seqmix_register_mixers(register):
            raise RuntimeError("boom in register")
    """})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = load_registry()
    assert SIX <= set(reg.names())  # everything else still loads
    by_plugin = {p.plugin: p for p in reg.problems}
    assert {"zz_broken", "zz_dup", "zz_raiser"} <= set(by_plugin), reg.problems
    assert "ModuleNotFoundError" in by_plugin["zz_broken"].message and by_plugin["zz_broken"].dist == "fake-broken"
    assert "seqmix" in by_plugin["zz_dup"].message and "fake-dup" in by_plugin["zz_dup"].message
    assert "boom in register" in by_plugin["zz_raiser"].message
    assert reg.mixers["mlp"].dist == "seqmix"  # the first registration wins


def test_registering_a_non_mixer_is_reported(tmp_path, monkeypatch):
    _fake_dist(tmp_path, "fake-bad", {"zz_bad": "fake_bad_plugin"}, {"fake_bad_plugin": """
        from seqmix.hookspecs import hookimpl

        @hookimpl
        def seqmix_register_mixers(register):
            register(int)
    """})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = load_registry()
    assert any("not a subclass of seqmix.mixer.Mixer" in p.message for p in reg.problems)


def test_unknown_name_suggests_the_closest():
    reg = load_registry()
    assert "Did you mean 'based'" in reg.unknown_message("basd")
    with pytest.raises(KeyError, match="Registered mixers"):
        reg.get("nope")
