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
    assert SIX - {"mlp"} <= set(reg.names())  # everything else still loads
    by_plugin = {p.plugin: p for p in reg.problems}
    assert {"zz_broken", "zz_dup", "zz_raiser"} <= set(by_plugin), reg.problems
    assert "ModuleNotFoundError" in by_plugin["zz_broken"].message and by_plugin["zz_broken"].dist == "fake-broken"
    assert "seqmix" in by_plugin["zz_dup"].message and "fake-dup" in by_plugin["zz_dup"].message
    assert "boom in register" in by_plugin["zz_raiser"].message
    with pytest.raises(KeyError, match="ambiguous mixer 'mlp'.*seqmix 0.1.0.*fake-dup"):
        reg.get("mlp")  # a duplicate is never used silently, not even against a built-in


_EVIL_BASED = """
    from seqmix.hookspecs import hookimpl
    from seqmix.builtins.mlp import SwiGLU

    class NotBased(SwiGLU):
        name = "based"

    @hookimpl
    def seqmix_register_mixers(register):
        register(NotBased)
"""


@pytest.mark.parametrize("entry_point", ["aaa_based", "zzz_based", "based"])
def test_a_duplicate_mixer_name_is_refused_whichever_loads_first(tmp_path, monkeypatch, entry_point):
    from seqmix.spec import SpecError, parse_spec

    _fake_dist(tmp_path, "fake-evil", {entry_point: "fake_evil_plugin"}, {"fake_evil_plugin": _EVIL_BASED})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = load_registry()
    assert "based" not in reg and "based" in reg.conflicts
    assert {e.dist for e in reg.conflicts["based"]} == {"seqmix-plugin-based", "fake-evil"}
    with pytest.raises(SpecError) as info:
        parse_spec("swa,based", reg)
    text = str(info.value)
    assert "ambiguous mixer 'based'" in text and "seqmix-plugin-based" in text and "fake-evil" in text
    assert "pip uninstall fake-evil or seqmix-plugin-based" in text
    assert parse_spec("swa,mlp", reg)  # the other mixers are unaffected


def test_a_misspelt_hook_or_sys_exit_at_import_is_reported_and_commands_still_run(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from seqmix.cli import main

    _fake_dist(tmp_path, "fake-typo", {"zz_typo": "fake_typo_plugin"}, {"fake_typo_plugin": """
        from seqmix.hookspecs import hookimpl

        @hookimpl
        def seqmix_register_mixer(register):
            raise AssertionError("never called")
    """})
    _fake_dist(tmp_path, "fake-exit", {"zz_exit": "fake_exit_plugin"}, {"fake_exit_plugin": """
        import sys
        sys.exit(3)
    """})
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = load_registry()
    assert SIX <= set(reg.names())
    by_plugin = {p.plugin: p for p in reg.problems}
    assert "'seqmix_register_mixer' (did you mean 'seqmix_register_mixers'?)" in by_plugin["zz_typo"].message
    assert "sys.exit(3)" in by_plugin["zz_exit"].message and by_plugin["zz_exit"].dist == "fake-exit"
    runner = CliRunner()
    out = runner.invoke(main, ["build", "conv,mlp", "--d-model", "64", "--json"])
    assert out.exit_code == 0 and out.exception is None, out.output
    out = runner.invoke(main, ["plugins"])
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "zz_typo (fake-typo)" in text and "did you mean 'seqmix_register_mixers'" in text
    assert "zz_exit (fake-exit)" in text and "sys.exit(3)" in text


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
