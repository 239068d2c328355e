"""The `seqmix` CLI: build (table, JSON, save, forward), plugins, and one-screen errors without tracebacks."""
import json

import pytest
from click.testing import CliRunner

from seqmix.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_build_json_reports_blocks_totals_and_attention_comparison():
    r = run("build", "based,swa32,mlp", "--layers", "6", "--d-model", "64", "--heads", "4", "--seq-len", "512",
            "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["spec"] == "based,swa:32,mlp,based,swa:32,mlp"
    assert d["spec_compact"] == "(based,swa:32,mlp)*2"
    assert [b["mixer"] for b in d["blocks"]] == ["based", "swa:32", "mlp"] * 2
    assert d["totals"]["params"] == sum(b["params"] for b in d["blocks"]) + (50264 + 1) * 64
    assert d["attention_depth"] == 4 and d["attention_kv_cache_bytes"] == 4 * 2 * 512 * 64 * 2
    swa = d["blocks"][1]
    assert swa["state_bytes"] > 0 and swa["flops_per_token"] > 0


def test_build_based_360m_table():
    r = run("build", "based-360m")
    assert r.exit_code == 0, r.output
    assert "362,620,928" in r.output and "swa:129" in r.output and "KV cache" in r.output


def test_build_save_and_forward(tmp_path):
    r = run("build", "conv,mlp", "--d-model", "32", "--heads", "2", "--vocab", "100", "--forward", "16",
            "--save", str(tmp_path / "m"), "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert abs(d["forward"]["loss"] - d["forward"]["uniform_loss"]) < 0.5
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["spec"] == "conv,mlp" and cfg["vocab_size"] == 100


@pytest.mark.parametrize("spec,needle", [
    ("basd,swa", "did you mean 'based'"),
    ("swa:-1", "window"),
    ("based:feature_dim=x", "feature_dim"),
    ("(based,mlp", ""),
    ("mlp*0", ""),
])
def test_bad_specs_get_a_caret_and_no_traceback(spec, needle):
    r = run("build", spec)
    assert r.exit_code == 2
    assert "Traceback" not in r.output and "^" in r.output and spec in r.output
    assert needle.lower() in r.output.lower()


def test_layers_not_a_multiple_names_both_numbers():
    r = run("build", "based,swa,mlp,conv,mlp", "--layers", "36")
    assert r.exit_code == 2 and "36" in r.output and "5" in r.output and "Traceback" not in r.output


def test_heads_not_dividing_width_is_a_clear_error():
    r = run("build", "swa:8:5", "--d-model", "64")
    assert r.exit_code == 2 and "heads" in r.output and "Traceback" not in r.output


def test_plugins_json_lists_all_six_mixers():
    r = run("plugins", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    by = {m["name"]: m for m in d["mixers"]}
    assert {"based", "swa", "attn", "mamba", "conv", "mlp"} <= set(by)
    assert by["based"]["dist"] == "seqmix-plugin-based" and by["based"]["state_kind"] == "recurrent"
    assert [a["name"] for a in by["based"]["args"]][:3] == ["impl", "feature_dim", "heads"]
    assert by["swa"]["impls"]["cpu"]["reference"] == "ok"
    assert "parallel" in by["based"]["impls"]["cpu"] and by["based"]["impls"]["cpu"]["parallel"] != "ok"


def test_plugins_table():
    r = run("plugins")
    assert r.exit_code == 0 and "mamba" in r.output and "recurrent" in r.output


@pytest.mark.parametrize("flag", [["--forward", "8"], ["--save", "SAVE"]])
def test_a_model_that_cannot_fit_in_memory_is_refused_before_anything_is_allocated(tmp_path, flag):
    flag = [str(tmp_path / "m") if a == "SAVE" else a for a in flag]
    r = run("build", "mlp:9999999999", "--d-model", "1024", *flag)  # 2e13 parameters: 111 TiB of fp32
    assert r.exit_code == 2, (r.output, r.exception)
    assert f"{flag[0]} would need about 111.76 TiB of memory" in r.output and "30,720,051,469,312" in r.output
    assert not (tmp_path / "m").exists()
    assert run("build", "mlp:9999999999", "--d-model", "1024", "--json").exit_code == 0  # the table alone: fine


def test_an_explicitly_named_kernel_that_cannot_run_here_is_a_clear_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU machine
    for args in (["based:parallel"], ["based:parallel", "--forward", "8"]):
        r = run("build", *args, "--d-model", "64", "--heads", "4")
        assert r.exit_code == 2, (r.output, r.exception)
        assert "based impl='parallel' cannot run on this machine (cpu)" in r.output and "auto" in r.output


@pytest.mark.parametrize("device, needle", [("cuda", "use --device cpu"), ("cuda:0", "use --device cpu"),
                                            ("gpu", "is not a device name"), ("mps", "runs on cpu or cuda")])
def test_generate_on_a_device_this_machine_lacks_is_a_clear_error(monkeypatch, device, needle):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU machine
    r = run("generate", "mlp", "--layers", "2", "--d-model", "32", "--tokenizer", "bytes", "--prompt", "Hi",
            "--device", device)
    assert r.exit_code == 2 and needle in r.output, (r.output, r.exception)


def test_generate_with_nan_weights_stops_with_a_message_instead_of_nul_bytes(tmp_path):
    import torch

    from seqmix.io import save as save_pretrained
    from seqmix.config import ModelConfig
    from seqmix.model import build_model
    from seqmix.tokenizer import save_tokenizer_config

    model = build_model(ModelConfig(spec="conv,mlp", d_model=32, n_heads=2, vocab_size=257))
    with torch.no_grad():
        model.embed.weight[:, 0] = float("nan")
    save_pretrained(model, tmp_path / "m")
    save_tokenizer_config(tmp_path / "m", "bytes")
    r = run("generate", str(tmp_path / "m"), "--prompt", "Hi", "--max-new-tokens", "4")
    assert r.exit_code == 2, (r.output, r.exception)
    assert "logits are NaN or infinite" in r.output and "\x00" not in r.output
    r = run("generate", "mlp", "--layers", "2", "--d-model", "32", "--tokenizer", "bytes", "--prompt", "Hi",
            "--max-new-tokens", "4", "--temperature", "1e-45", "--seed", "1")
    greedy = run("generate", "mlp", "--layers", "2", "--d-model", "32", "--tokenizer", "bytes", "--prompt", "Hi",
                 "--max-new-tokens", "4", "--temperature", "0", "--seed", "1")
    assert r.exit_code == 0 and "\x00" not in r.output and r.output.splitlines()[0] == greedy.output.splitlines()[0]


@pytest.mark.parametrize("option", ["--d-model", "--heads", "--layers", "--vocab", "--seq-len"])
def test_an_integer_option_beyond_int64_is_a_usage_error(option):
    r = run("build", "mlp", option, "99999999999999999999")
    assert r.exit_code == 2 and "is not in the range" in r.output, (r.output, r.exception)
