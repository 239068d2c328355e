"""Checkpoint import and round trips: a Based-repo checkpoint written here, checked against naive published math."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from seqmix.checkpoint import from_pretrained, save_pretrained
from seqmix.cli import main
from seqmix.config import NAMED_ARCHS, ModelConfig, resolve_model
from seqmix.convert import ConversionError, based_repo_model_config, convert_based_repo
from seqmix.model import build_model

# Converted fp32 model vs the fp64 naive reference: max |error| relative to the largest logit. fp32 round-off
# through 12 residual blocks sits near 5e-6 of the logit scale; a wrong window, scale or layout is above 1e-2.
TOL = {torch.float32: 1e-5}

# A small checkpoint in the published layout: conv elsewhere, linear attention at 1 and 4, sliding window at 2
# and 4 (alt_mixer_2_layers wins, as in the Based repo), 4 heads, Taylor feature dim 4.
D, N_LAYER, VOCAB, PAD, N_HEAD, FEAT, WINDOW_SIZE = 64, 6, 100, 8, 4, 4, 16
CONFIG = {
    "n_embd": D, "n_layer": N_LAYER, "n_head": N_HEAD, "n_inner": 2 * D, "vocab_size": VOCAB,
    "pad_vocab_size_multiple": PAD, "layer_norm_epsilon": 1e-5,
    "alt_mixer_layers": [1, 4], "alt_mixer_2_layers": [2, 4],
    "alt_mixer": {"feature_dim": FEAT, "num_heads": N_HEAD, "feature_map": "taylor_exp"},
    "alt_mixer_2": {"window_size": WINDOW_SIZE, "num_heads": N_HEAD},
    "mixer": {"expand_proj": 2, "kernel_size": 3},
}


def _kind(i: int) -> str:
    return "swa" if i in CONFIG["alt_mixer_2_layers"] else "based" if i in CONFIG["alt_mixer_layers"] else "conv"


def published_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the published key names (with the `model.` prefix, a metrics entry, a tied head)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    V = math.ceil(VOCAB / PAD) * PAD
    sd = {"transformer.embeddings.word_embeddings.weight": w(V, D, std=0.1), "transformer.ln_f.weight": 1 + w(D)}
    for i in range(N_LAYER):
        p = f"transformer.layers.{i}."
        sd[p + "norm1.weight"], sd[p + "norm2.weight"] = 1 + w(D), 1 + w(D)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc2.weight"] = w(4 * D, D), w(D, 2 * D)
        if _kind(i) == "conv":
            sd[p + "mixer.in_proj.weight"], sd[p + "mixer.in_proj.bias"] = w(4 * D, D), w(4 * D)
            sd[p + "mixer.conv.conv.weight"] = w(2 * D, 1, 3, std=0.5)
            sd[p + "mixer.out_proj.weight"], sd[p + "mixer.out_proj.bias"] = w(D, 2 * D), w(D)
        elif _kind(i) == "based":
            for name in ("proj_q", "proj_k"):
                sd[p + f"mixer.{name}.weight"] = w(N_HEAD * FEAT, D, std=0.3)
            sd[p + "mixer.proj_v.weight"], sd[p + "mixer.out_proj.weight"] = w(D, D), w(D, D)
        else:
            sd[p + "mixer.Wqkv.weight"], sd[p + "mixer.out_proj.weight"] = w(3 * D, D, std=0.3), w(D, D)
    out = {"model." + k: v for k, v in sd.items()}
    out["model.lm_head.weight"] = sd["transformer.embeddings.word_embeddings.weight"].clone()
    out["model.train_metrics.acc"] = torch.zeros(())
    return out


def write_checkpoint(path, sd=None, config=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or CONFIG))
    torch.save(published_state_dict() if sd is None else sd, path / "pytorch_model.bin")
    return path


# -- the published math, written out naively (fp64, loops; no seqmix code) ------------------------
def rms(x, w, eps=1e-5):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def swiglu(x, sd, p):
    h = x @ sd[p + "mlp.fc1.weight"].T
    y, gate = h[..., : h.shape[-1] // 2], h[..., h.shape[-1] // 2 :]
    return (F.silu(gate) * y) @ sd[p + "mlp.fc2.weight"].T


def base_conv(x, sd, p):
    B, T, _ = x.shape
    u = x @ sd[p + "mixer.in_proj.weight"].T + sd[p + "mixer.in_proj.bias"]
    a, gate = u[..., : 2 * D], u[..., 2 * D :]
    W = sd[p + "mixer.conv.conv.weight"]  # [C, 1, K]; W[:, 0, K-1] multiplies the current token
    K = W.shape[-1]
    c = torch.zeros_like(a)
    for t in range(T):
        for j in range(K):
            s = t - (K - 1) + j
            if s >= 0:
                c[:, t] += W[:, 0, j] * a[:, s]
    return (F.silu(c) * gate) @ sd[p + "mixer.out_proj.weight"].T + sd[p + "mixer.out_proj.bias"]


def taylor_phi(x):
    f = x.shape[-1]
    outer = torch.einsum("...i,...j->...ij", x, x).flatten(-2)
    return torch.cat([torch.ones_like(x[..., :1]), x / f**0.25, outer / (math.sqrt(2) * math.sqrt(f))], -1)


def linear_attention(x, sd, p):
    B, T, _ = x.shape
    q = (x @ sd[p + "mixer.proj_q.weight"].T).view(B, T, N_HEAD, FEAT)
    k = (x @ sd[p + "mixer.proj_k.weight"].T).view(B, T, N_HEAD, FEAT)
    v = (x @ sd[p + "mixer.proj_v.weight"].T).view(B, T, N_HEAD, D // N_HEAD)
    pq, pk = taylor_phi(q), taylor_phi(k)
    o = torch.zeros_like(v)
    for i in range(T):
        a = torch.einsum("bhe,bjhe->bjh", pq[:, i], pk[:, : i + 1])  # diagonal included
        o[:, i] = torch.einsum("bjh,bjhd->bhd", a, v[:, : i + 1]) / (a.sum(1)[..., None] + 1e-12)
    return o.reshape(B, T, D) @ sd[p + "mixer.out_proj.weight"].T


def rope(x):  # x [B, T, H, Dh], rotate-half over the full head dim, base 10000, positions from 0
    T, dh = x.shape[1], x.shape[-1]
    inv = 1.0 / 10000 ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv  # [T, Dh/2]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]
    rotated = torch.cat([-x[..., dh // 2 :], x[..., : dh // 2]], -1)
    return x * cos + rotated * sin


def sliding_window(x, sd, p):
    B, T, _ = x.shape
    dh = D // N_HEAD
    q, k, v = (x @ sd[p + "mixer.Wqkv.weight"].T).view(B, T, 3, N_HEAD, dh).unbind(2)
    q, k = rope(q), rope(k)
    o = torch.zeros_like(v)
    for i in range(T):
        lo = max(0, i - WINDOW_SIZE // 2)  # the query itself and window_size // 2 earlier tokens
        s = torch.einsum("bhd,bjhd->bjh", q[:, i], k[:, lo : i + 1]) / math.sqrt(dh)
        o[:, i] = torch.einsum("bjh,bjhd->bhd", s.softmax(1), v[:, lo : i + 1])
    return o.reshape(B, T, D) @ sd[p + "mixer.out_proj.weight"].T


def naive_logits(sd, tokens):
    sd = {k.removeprefix("model."): v.double() for k, v in sd.items() if "metrics" not in k}
    x = sd["transformer.embeddings.word_embeddings.weight"][tokens]
    mixers = {"conv": base_conv, "based": linear_attention, "swa": sliding_window}
    for i in range(N_LAYER):
        p = f"transformer.layers.{i}."
        x = x + mixers[_kind(i)](rms(x, sd[p + "norm1.weight"]), sd, p)
        x = x + swiglu(rms(x, sd[p + "norm2.weight"]), sd, p)
    x = rms(x, sd["transformer.ln_f.weight"])
    return (x @ sd["transformer.embeddings.word_embeddings.weight"].T)[..., :VOCAB]


# -- tests ------------------------------------------------------------------------------------------
def test_published_layer_lists_map_to_the_named_architectures():
    for name, n_layer, d, lin, sw in (("based-360m", 27, 1024, [1, 6, 11, 16, 21], [2, 7, 12, 17, 22]),
                                      ("based-1b", 36, 1792, [1, 6, 11, 16, 21, 27, 33],
                                       [2, 7, 12, 17, 22, 28, 34])):
        cfg = dict(n_embd=d, n_layer=n_layer, n_head=16, vocab_size=50257, pad_vocab_size_multiple=8,
                   alt_mixer_layers=lin, alt_mixer_2_layers=sw, alt_mixer=dict(feature_dim=16, num_heads=16),
                   alt_mixer_2=dict(window_size=256, num_heads=16), mixer=dict(expand_proj=2, kernel_size=3))
        config = based_repo_model_config(cfg, set())
        assert config.spec == resolve_model(name).spec, name
        assert (config.d_model, config.padded_vocab_size) == (NAMED_ARCHS[name]["d_model"], 50264)
        assert build_model(config, device="meta").num_params() == {"based-360m": 362_620_928,
                                                                   "based-1b": 1_349_453_056}[name]


def test_based_repo_import_matches_naive_published_math(tmp_path):
    src = write_checkpoint(tmp_path / "based")
    model = convert_based_repo(src)
    kinds = [_kind(i) for i in range(N_LAYER)]
    assert kinds == ["conv", "based", "swa", "conv", "swa", "conv"]
    want = ",".join(f"{ {'conv': 'conv', 'based': 'based:feature_dim=4', 'swa': 'swa:9'}[k]},mlp" for k in kinds)
    assert model.config.spec == want.replace(" ", "")
    tokens = torch.randint(0, VOCAB, (3, 63), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(tokens)
    ref = naive_logits(published_state_dict(), tokens)
    assert got.dtype == torch.float32 and not got.isnan().any()
    assert ref.abs().max() > 1.0  # the random weights are large enough that every layer matters
    err = (got.double() - ref).abs().max() / ref.abs().max()
    assert err < TOL[torch.float32], f"max error {err:.2e} of the logit scale"


def test_naive_reference_can_fail(tmp_path):
    """The comparison is sensitive to the window convention: a window one token wider gives other logits."""
    model = convert_based_repo(write_checkpoint(tmp_path / "based"))
    wider = build_model(ModelConfig.from_dict({**model.config.to_dict(),
                                               "spec": model.config.spec.replace("swa:9", "swa:10")}))
    wider.load_state_dict(model.state_dict())
    tokens = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert not torch.allclose(wider(tokens).double(), naive_logits(published_state_dict(), tokens), atol=1e-3)


def test_convert_cli_writes_a_model_directory(tmp_path):
    src = write_checkpoint(tmp_path / "based")
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    loaded, direct = from_pretrained(tmp_path / "out"), convert_based_repo(src)
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), direct(tokens))


def test_mismatch_names_missing_unexpected_and_misshapen_keys(tmp_path):
    sd = published_state_dict()
    del sd["model.transformer.layers.1.mixer.proj_q.weight"]
    sd["model.transformer.layers.3.mixer.extra.weight"] = torch.zeros(2)
    sd["model.transformer.layers.5.mlp.fc2.weight"] = torch.zeros(D, 3 * D)
    sd["model.transformer.layers.0.mixer.out_proj.weight"] = torch.zeros(D, D)
    with pytest.raises(ConversionError) as e:
        convert_based_repo(write_checkpoint(tmp_path / "bad", sd))
    msg = str(e.value)
    assert "transformer.layers.1.mixer.proj_q.weight" in msg and "transformer.layers.3.mixer.extra.weight" in msg
    assert "transformer.layers.0.mixer.out_proj.weight: checkpoint [64, 64]" in msg
    assert "transformer.layers.5.mlp.fc2.weight: checkpoint [64, 192]" in msg
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "bad"), str(tmp_path / "out")])
    assert r.exit_code == 2 and "missing keys" in r.output and not (tmp_path / "out").exists()


def test_bin_files_are_loaded_without_unpickling_code(tmp_path):
    src = write_checkpoint(tmp_path / "evil", {"model.x": torch.zeros(1), "model.f": print})
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        convert_based_repo(src)


def test_round_trip_all_six_mixers_identical_logits_and_generation(tmp_path):
    torch.manual_seed(0)
    config = resolve_model("conv,based:feature_dim=4,swa:5,attn,mamba:4,mlp", d_model=32, n_heads=4,
                           vocab_size=61, max_seqlen=64)
    model = build_model(config)
    out = save_pretrained(model, tmp_path / "m")
    loaded = from_pretrained(out)
    assert loaded.config == model.config
    tokens = torch.randint(0, 61, (3, 21), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    a = model.generate(tokens, max_new_tokens=8, temperature=0.0)
    b = loaded.generate(tokens, max_new_tokens=8, temperature=0.0)
    assert a.shape == (3, 8) and torch.equal(a, b)


def test_mamba_layout_imports_as_a_mamba_stack(tmp_path):
    config = resolve_model("mamba*3", d_model=32, vocab_size=50, n_heads=4)
    config.pad_vocab_multiple = 8
    ref = build_model(config)
    sd = {}
    for k, v in ref.state_dict().items():
        k = k.replace("embed.weight", "backbone.embedding.weight").replace("norm_f.", "backbone.norm_f.")
        sd[k.replace("blocks.", "backbone.layers.")] = v.clone()
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    cfg = {"d_model": 32, "n_layer": 3, "vocab_size": 50, "pad_vocab_size_multiple": 8, "rms_norm": True,
           "ssm_cfg": {"d_state": 16, "d_conv": 4, "expand": 2}}
    model = convert_based_repo(write_checkpoint(tmp_path / "mamba", sd, cfg))
    assert model.config.spec == "mamba,mamba,mamba"
    tokens = torch.randint(0, 50, (2, 13), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(model(tokens), ref(tokens))
    with pytest.raises(ConversionError, match="LayerNorm"):
        convert_based_repo(write_checkpoint(tmp_path / "ln", sd, {**cfg, "rms_norm": False}))


def test_attention_baseline_layout_imports_with_partial_rotary(tmp_path):
    cfg = {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 50, "pad_vocab_size_multiple": 16,
           "rotary_emb_dim": 4, "n_inner": 48}
    sd = {"transformer.embeddings.word_embeddings.weight": torch.randn(64, 32), "transformer.ln_f.weight":
          torch.ones(32)}
    for i in range(2):
        p = f"transformer.layers.{i}."
        sd.update({p + "norm1.weight": torch.ones(32), p + "norm2.weight": torch.ones(32),
                   p + "mixer.Wqkv.weight": torch.randn(96, 32), p + "mixer.out_proj.weight": torch.randn(32, 32),
                   p + "mixer.rotary_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, 4, 2).float() / 4),
                   p + "mlp.fc1.weight": torch.randn(96, 32), p + "mlp.fc2.weight": torch.randn(32, 48)})
    model = convert_based_repo(write_checkpoint(tmp_path / "attn", sd, cfg))
    assert model.config.spec == "attn:rotary_dim=4,mlp:48,attn:rotary_dim=4,mlp:48"
    assert torch.equal(model.blocks[2].mixer.Wqkv.weight, sd["transformer.layers.1.mixer.Wqkv.weight"])
    assert torch.equal(model.blocks[3].mixer.fc2.weight, sd["transformer.layers.1.mlp.fc2.weight"])
    sd["transformer.layers.0.mixer.rotary_emb.inv_freq"] = torch.ones(2)
    with pytest.raises(ConversionError, match="rotary frequencies"):
        convert_based_repo(write_checkpoint(tmp_path / "attn2", sd, cfg))
