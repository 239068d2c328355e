"""transformers import: small random Llama and Mamba models built by transformers itself, checked against its forward."""
import json

import pytest
import torch
from click.testing import CliRunner

import transformers

from seqmix.io import load  # noqa: E402
from seqmix.cli import main  # noqa: E402
from seqmix.io import ConversionError  # noqa: E402
from seqmix.io.importers.hf import convert_llama, convert_mamba_hf  # noqa: E402

# max |seqmix - transformers| / max |transformers logits|. Both run the same math in fp32 in a different order
# (fused vs separate projections, SDPA vs eager attention, chunked vs sequential scan): ~1e-6. A wrong fc1
# half, RoPE layout, GQA grouping or norm is above 1e-1.
TOL = {torch.float32: 1e-4}
VOCAB, B, T, NEW = 101, 3, 63, 10


def llama(tie: bool = False, **kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        vocab_size=VOCAB, rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, **kw)
    return transformers.LlamaForCausalLM(cfg).eval()


def mamba(**kw):
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=VOCAB, state_size=8,
                                   expand=2, conv_kernel=4, time_step_rank=3, **kw)
    model = transformers.MambaForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers' init leaves some weights near zero; make every path matter
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", "mixer.D")):
                p.add_(torch.randn_like(p) * 0.3)
            elif name.endswith("conv1d.bias"):
                p.copy_(torch.randn_like(p) * 0.3)
    return model


def tokens(seed: int = 1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_logits_match(ours, theirs, dtype=torch.float32):
    ids = tokens()
    with torch.no_grad():
        want = theirs(ids).logits
        got = ours(ids)
    assert got.shape == want.shape == (B, T, VOCAB)
    assert not got.isnan().any()
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < TOL[dtype], f"normalised logit error {err:.2e}"


def assert_greedy_matches(ours, theirs):
    prompt = tokens(2)[:, :17]
    theirs.generation_config.eos_token_id = None  # no early stop: compare all NEW tokens
    want = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False,
                           pad_token_id=0)[:, prompt.shape[1]:]
    got = ours.generate(prompt, max_new_tokens=NEW, temperature=0.0)
    assert want.shape == (B, NEW) and torch.equal(got, want)
    # the comparison is decisive only if no step's top two logits are near-tied
    with torch.no_grad():
        top2 = theirs(torch.cat([prompt, want], 1)).logits[:, prompt.shape[1] - 1:-1].topk(2).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-3


@pytest.mark.parametrize("tie", [False, True])
def test_llama_logits_and_greedy_generation_match_transformers(tmp_path, tie):
    ref = llama(tie)
    ref.save_pretrained(tmp_path / "llama")
    model = convert_llama(tmp_path / "llama")
    assert model.config.spec == ",".join(["attn:kv_heads=2:rope_base=5000.0,mlp:96"] * 2)
    assert model.config.tie_embeddings == tie and (model.lm_head is None) == tie
    assert model.config.padded_vocab_size == 104 and model.embed.weight[VOCAB:].abs().max() == 0
    assert_logits_match(model, ref)
    assert_greedy_matches(model, ref)


def test_mamba_logits_and_greedy_generation_match_transformers(tmp_path):
    ref = mamba()
    ref.save_pretrained(tmp_path / "mamba")
    model = convert_mamba_hf(tmp_path / "mamba")
    assert model.config.spec == "mamba:8:dt_rank=3,mamba:8:dt_rank=3"
    assert_logits_match(model, ref)
    assert_greedy_matches(model, ref)


def test_convert_cli_detects_llama_and_mamba_and_round_trips(tmp_path):
    llama().save_pretrained(tmp_path / "llama")
    ref = mamba()
    ref.save_pretrained(tmp_path / "mamba")
    runner = CliRunner()
    for name in ("llama", "mamba"):
        r = runner.invoke(main, ["convert", str(tmp_path / name), str(tmp_path / f"{name}-seqmix")])
        assert r.exit_code == 0, r.output
        assert name.replace("llama", "attn") in r.output
    assert_logits_match(load(tmp_path / "mamba-seqmix"), ref)


def test_in_memory_model_converts_like_its_directory(tmp_path):
    ref = llama()
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(convert_llama(ref)(ids), convert_llama(ref, pad_vocab_multiple=1)(ids))


@pytest.mark.parametrize("change, match", [
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "RoPE scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"head_dim": 32}, "head_dim"),
])
def test_llama_features_seqmix_cannot_express_are_refused(tmp_path, change, match):
    llama().save_pretrained(tmp_path / "l")
    cfg = json.loads((tmp_path / "l/config.json").read_text())
    (tmp_path / "l/config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ConversionError, match=match):
        convert_llama(tmp_path / "l")


def test_llama_mismatched_weights_name_the_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    llama().save_pretrained(tmp_path / "l")
    sd = load_file(str(tmp_path / "l/model.safetensors"))
    sd["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 64)
    save_file(sd, str(tmp_path / "l/model.safetensors"))
    with pytest.raises(ConversionError, match=r"(?s)unexpected keys: \['model\.layers\.1\.mlp\.extra.*Wqkv"):
        convert_llama(tmp_path / "l")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, str(tmp_path / "l/model.safetensors"))
    with pytest.raises(ConversionError, match="down_proj"):
        convert_llama(tmp_path / "l")
