"""Based-repo checkpoint import, checked against a naive fp64 model written from the original code's semantics.

The configs are the reference YAMLs' `model.config` blocks (HazyResearch/based train/configs/experiment/reference/
based-360m.yaml, attn-360m.yaml, attn-1b.yaml) with every key kept, interpolations resolved as the published
config.json files have them, and only widths and depths shrunk. The naive model follows what the original code
does (REFERENCE.md; based/models/gpt.py, mixers/convolution.py, flash-attn 2.5's GatedMlp and RotaryEmbedding):
  1. BaseConv: d_inner = expand_proj * d // 2; in_proj d -> expand_proj * d = [conv half | gate half];
     `kernel_sizes` (plural) is swallowed by **kwargs, so the kernel is the default 3.
  2. GatedMlp: hidden = ceil(h / 256) * 256 with h = n_inner if set, else int(8 * d / 3).
  3. Rotary dim R = int(rotary_emb_fraction * head_dim) for attention *and* sliding-window layers (0 if absent).
  4. RotaryEmbedding(dim=R): inv_freq = 1 / 10000^(arange(0, R, 2) / R), rotate-half over 2 * ceil(R / 2) channels.
  Also: keys absent from config.json take GPT2Config's defaults (vocab 50257); the sliding window attends itself
  and window_size // 2 earlier tokens; softmax scale head_dim^-0.5; Taylor map with the diagonal included.
"""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from seqmix.io import load, save
from seqmix.cli import main
from seqmix.config import NAMED_ARCHS, ModelConfig, resolve_model
from seqmix.io import ConversionError
from seqmix.io.importers.based_repo import based_repo_model_config, convert_based_repo
from seqmix.model import build_model

TOL = 1e-5  # relative (norm) error of the converted fp32 model's logits against the fp64 naive model

_COMMON = {  # the keys every reference config block carries, verbatim
    "rms_norm": True, "fused_mlp": False, "attn_pdrop": 0, "embd_pdrop": 0, "n_positions": 2048, "resid_pdrop": 0,
    "mlp_fc1_bias": False, "mlp_fc2_bias": False, "fused_bias_fc": True, "out_proj_bias": False,
    "qkv_proj_bias": False, "use_flash_attn": True, "residual_in_fp32": True, "activation_function": "swiglu",
    "fused_dropout_add_ln": True, "max_position_embeddings": 0, "reorder_and_upcast_attn": False,
    "scale_attn_by_inverse_layer_idx": False,
}
# based-360m.yaml: d 1024 -> 64, heads 16 -> 4, 27 -> 6 layers, feature dim 16 -> 4, window 256 -> 16. n_inner =
# 2 * n_embd = 128 is not a multiple of 256 here, so GatedMlp's rounding matters (-> 256). Layer 4 is in both lists
# (alt_mixer_2 is checked first in the original).
BASED = {
    "alt_mixer_layers": [1, 4], "alt_mixer_2_layers": [2, 4],
    "mixer": {"_target_": "based.models.mixers.convolution.BaseConv", "l_max": 2048, "use_bias": True,
              "expand_proj": 4, "kernel_sizes": 3},
    "alt_mixer": {"_target_": "based.models.mixers.linear_attention.LinearAttention", "l_max": 2048,
                  "feature_map": {"_target_": "based.models.mixers.linear_attention.TaylorExp", "input_dim": 4},
                  "feature_dim": 4, "num_heads": 4, "parallel_implementation": "fla_parallel"},
    "alt_mixer_2": {"_target_": "based.models.mixers.slide_attention.SlidingAttention", "window_size": 16,
                    "num_heads": 4, "causal": True},
    "n_embd": 64, "special_initializer": True, "n_head": 4, "n_layer": 6,
    "_target_": "based.models.gpt.GPT2MixerConfig", **_COMMON, "rotary_emb_fraction": 1,
    "pad_vocab_size_multiple": 8, "n_inner": 128,
}
BASED["vocab_size"] = 100  # (not in the YAML, whose GPT-2 default 50257 the attention configs below keep)
# attn-360m.yaml: d 1024 -> 64, 16 -> 4 heads (head dim 16, rotary 8 of 16), 24 -> 2 layers; no n_inner, so
# GatedMlp's default int(8 * 64 / 3) = 170 -> 256; no vocab_size: GPT2Config's 50257.
ATTN_360M = {"n_embd": 64, "n_head": 4, "n_layer": 2, "_target_": "transformers.GPT2Config", **_COMMON,
             "rotary_emb_fraction": 0.5, "pad_vocab_size_multiple": 16, "ff_mult": 4}
# attn-1b.yaml's head size: head dim 70 (d 1680 / 24 heads -> 140 / 2), rotary int(0.5 * 70) = 35 rotating 36.
ATTN_1B = {**ATTN_360M, "n_embd": 140, "n_head": 2}
# The same with the full rotary fraction and an n_inner that is not a multiple of 256 (300 -> 512).
ATTN_FULL_ROTARY = {**ATTN_360M, "rotary_emb_fraction": 1, "n_inner": 300}
CONFIGS = {"based-360m": BASED, "attn-360m": ATTN_360M, "attn-1b": ATTN_1B, "attn-full-rotary": ATTN_FULL_ROTARY}


# -- the original model's facts, written out (no seqmix code) ---------------------------------------
def layer_kind(cfg, i: int) -> str:
    if i in (cfg.get("alt_mixer_2_layers") or ()):
        return "swa" if cfg.get("alt_mixer_2") else "attn"
    if i in (cfg.get("alt_mixer_layers") or ()):
        return "based" if cfg.get("alt_mixer") else "attn"
    return "conv" if cfg.get("mixer") else "attn"


def mlp_hidden(cfg) -> int:
    h = cfg["n_inner"] if cfg.get("n_inner") is not None else int(8 * cfg["n_embd"] / 3)
    return math.ceil(h / 256) * 256


def published_state_dict(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the original layout (a `model.` prefix, a metrics entry, the tied head stored)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    d, H = cfg["n_embd"], cfg["n_head"]
    m = cfg["pad_vocab_size_multiple"]
    V = math.ceil(cfg.get("vocab_size", 50257) / m) * m
    hidden = mlp_hidden(cfg)
    sd = {"transformer.embeddings.word_embeddings.weight": w(V, d), "transformer.ln_f.weight": 1 + w(d)}
    for i in range(cfg["n_layer"]):
        p = f"transformer.layers.{i}."
        sd[p + "norm1.weight"], sd[p + "norm2.weight"] = 1 + w(d), 1 + w(d)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc2.weight"] = w(2 * hidden, d), w(d, hidden)
        kind = layer_kind(cfg, i)
        if kind == "conv":
            ep = cfg["mixer"]["expand_proj"]
            inner = ep * d // 2
            sd[p + "mixer.in_proj.weight"], sd[p + "mixer.in_proj.bias"] = w(ep * d, d), w(ep * d)
            sd[p + "mixer.conv.conv.weight"] = w(inner, 1, 3, std=0.5)
            sd[p + "mixer.out_proj.weight"], sd[p + "mixer.out_proj.bias"] = w(d, inner), w(d)
        elif kind == "based":
            hf = cfg["alt_mixer"]["num_heads"] * cfg["alt_mixer"]["feature_dim"]
            sd[p + "mixer.proj_q.weight"], sd[p + "mixer.proj_k.weight"] = w(hf, d, std=0.3), w(hf, d, std=0.3)
            sd[p + "mixer.proj_v.weight"], sd[p + "mixer.out_proj.weight"] = w(d, d), w(d, d)
        else:
            sd[p + "mixer.Wqkv.weight"], sd[p + "mixer.out_proj.weight"] = w(3 * d, d, std=0.3), w(d, d)
    out = {"model." + k: v for k, v in sd.items()}
    out["model.lm_head.weight"] = sd["transformer.embeddings.word_embeddings.weight"].clone()
    out["model.train_metrics.acc"] = torch.zeros(())
    return out


def write_checkpoint(path, cfg, sd=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    torch.save(published_state_dict(cfg) if sd is None else sd, path / "pytorch_model.bin")
    return path


def rms(x, w, eps=1e-5):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def swiglu(x, sd, p):
    y, gate = (x @ sd[p + "mlp.fc1.weight"].T).chunk(2, -1)  # the gate is the second half
    return (F.silu(gate) * y) @ sd[p + "mlp.fc2.weight"].T


def base_conv(x, sd, p, cfg):
    T, inner = x.shape[1], cfg["mixer"]["expand_proj"] * cfg["n_embd"] // 2
    u = x @ sd[p + "mixer.in_proj.weight"].T + sd[p + "mixer.in_proj.bias"]
    a, gate = u[..., :inner], u[..., inner:]
    W = sd[p + "mixer.conv.conv.weight"]  # nn.Conv1d [C, 1, 3], padding 2, first T outputs: W[..., 2] * x_t
    c = torch.zeros_like(a)
    for t in range(T):
        for j in range(3):
            if t - 2 + j >= 0:
                c[:, t] += W[:, 0, j] * a[:, t - 2 + j]
    return (F.silu(c) * gate) @ sd[p + "mixer.out_proj.weight"].T + sd[p + "mixer.out_proj.bias"]


def taylor_phi(x):
    f = x.shape[-1]
    outer = torch.einsum("...i,...j->...ij", x, x).flatten(-2)
    return torch.cat([torch.ones_like(x[..., :1]), x / f**0.25, outer / (math.sqrt(2) * math.sqrt(f))], -1)


def linear_attention(x, sd, p, cfg):
    B, T, d = x.shape
    h, f = cfg["alt_mixer"]["num_heads"], cfg["alt_mixer"]["feature_dim"]
    q = taylor_phi((x @ sd[p + "mixer.proj_q.weight"].T).view(B, T, h, f))
    k = taylor_phi((x @ sd[p + "mixer.proj_k.weight"].T).view(B, T, h, f))
    v = (x @ sd[p + "mixer.proj_v.weight"].T).view(B, T, h, d // h)
    o = torch.zeros_like(v)
    for i in range(T):
        a = torch.einsum("bhe,bjhe->bjh", q[:, i], k[:, : i + 1])  # the diagonal included
        o[:, i] = torch.einsum("bjh,bjhd->bhd", a, v[:, : i + 1]) / (a.sum(1)[..., None] + 1e-12)
    return o.reshape(B, T, d) @ sd[p + "mixer.out_proj.weight"].T


def rotary(x, R):
    """flash-attn RotaryEmbedding(dim=R), non-interleaved, base 10000, positions from 0."""
    if R == 0:
        return x
    inv = 1.0 / 10000 ** (torch.arange(0, R, 2, dtype=torch.float64) / R)
    n = inv.numel()
    ang = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv
    c, s = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x[..., :n], x[..., n : 2 * n]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x[..., 2 * n :]], -1)


def attention(x, sd, p, cfg, window=None):
    B, T, d = x.shape
    H = cfg["n_head"]  # the sliding window's num_heads is overridden by n_head in the original
    dh = d // H
    R = int(cfg.get("rotary_emb_fraction", 0.0) * dh)
    q, k, v = (x @ sd[p + "mixer.Wqkv.weight"].T).view(B, T, 3, H, dh).unbind(2)
    q, k = rotary(q, R), rotary(k, R)
    o = torch.zeros_like(v)
    for i in range(T):
        lo = 0 if window is None else max(0, i - window // 2)
        s = torch.einsum("bhd,bjhd->bjh", q[:, i], k[:, lo : i + 1]) / math.sqrt(dh)
        o[:, i] = torch.einsum("bjh,bjhd->bhd", s.softmax(1), v[:, lo : i + 1])
    return o.reshape(B, T, d) @ sd[p + "mixer.out_proj.weight"].T


def naive_logits(cfg, sd, tokens):
    sd = {k.removeprefix("model."): v.double() for k, v in sd.items() if "metrics" not in k}
    E = sd["transformer.embeddings.word_embeddings.weight"]
    x = E[tokens]
    for i in range(cfg["n_layer"]):
        p, kind = f"transformer.layers.{i}.", layer_kind(cfg, i)
        h = rms(x, sd[p + "norm1.weight"])
        if kind == "conv":
            x = x + base_conv(h, sd, p, cfg)
        elif kind == "based":
            x = x + linear_attention(h, sd, p, cfg)
        else:
            x = x + attention(h, sd, p, cfg, cfg["alt_mixer_2"]["window_size"] if kind == "swa" else None)
        x = x + swiglu(rms(x, sd[p + "norm2.weight"]), sd, p)
    return (rms(x, sd["transformer.ln_f.weight"]) @ E.T)[..., : cfg.get("vocab_size", 50257)]


def rel_err(got, ref):
    return ((got.double() - ref).norm() / ref.norm()).item()


# -- tests ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_reference_configs_import_with_the_original_logits(tmp_path, name):
    """Forward logits, decode-step logits and greedy tokens of the converted model equal the naive model's."""
    cfg = CONFIGS[name]
    sd = published_state_dict(cfg)
    model = convert_based_repo(write_checkpoint(tmp_path / name, cfg, sd))
    vocab = cfg.get("vocab_size", 50257)
    tokens = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = naive_logits(cfg, sd, tokens)
    assert ref.abs().max() > 1.0  # the random weights are large enough that every layer matters
    with torch.no_grad():
        got = model(tokens)
        assert got.shape == ref.shape and rel_err(got, ref) < TOL, f"{name}: forward {rel_err(got, ref):.2e}"
        states = model.init_states(2, max_seqlen=64)
        steps = torch.stack([model.step(tokens[:, t], states)[0] for t in range(tokens.shape[1])], 1)
    assert rel_err(steps, ref) < TOL, f"{name}: decode steps {rel_err(steps, ref):.2e}"
    prompt, want = tokens[:, :20], tokens[:, :20]
    for _ in range(6):  # greedy decoding with the naive model
        want = torch.cat([want, naive_logits(cfg, sd, want)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, temperature=0.0), want[:, 20:])


def test_reference_configs_map_to_the_expected_specs(tmp_path):
    """What the four facts mean for each shrunk config, spelled out."""
    want = {
        "based-360m": "conv,mlp:256,based:feature_dim=4,mlp:256,swa:9,mlp:256,conv,mlp:256,swa:9,mlp:256,conv,mlp:256",
        "attn-360m": "attn:rotary_dim=8,mlp:256,attn:rotary_dim=8,mlp:256",
        "attn-1b": "attn:rotary_dim=35,mlp:512,attn:rotary_dim=35,mlp:512",
        "attn-full-rotary": "attn,mlp:512,attn,mlp:512",
    }
    for name, cfg in CONFIGS.items():
        config = based_repo_model_config(cfg, set())
        assert config.spec == want[name], name
        assert config.vocab_size == cfg.get("vocab_size", 50257)
    model = convert_based_repo(write_checkpoint(tmp_path / "b", BASED))
    assert model.blocks[0].mixer.inner == 128 and model.blocks[0].mixer.kernel_size == 3  # expand_proj 4 -> 2d


def test_published_configs_map_to_the_named_architectures():
    """Full-size reference configs give the named architectures and the published parameter counts."""
    based = {**BASED, "n_embd": 1024, "n_head": 16, "n_layer": 27, "n_inner": 2048, "vocab_size": 50257,
             "alt_mixer_layers": [1, 6, 11, 16, 21], "alt_mixer_2_layers": [2, 7, 12, 17, 22],
             "alt_mixer": {**BASED["alt_mixer"], "feature_dim": 16, "num_heads": 16},
             "alt_mixer_2": {**BASED["alt_mixer_2"], "window_size": 256, "num_heads": 16}}
    based_1b = {**based, "n_embd": 1792, "n_layer": 36, "n_inner": 3584, "alt_mixer_layers": [1, 6, 11, 16, 21, 27, 33],
                "alt_mixer_2_layers": [2, 7, 12, 17, 22, 28, 34]}
    attn_360m = {**ATTN_360M, "n_embd": 1024, "n_head": 16, "n_layer": 24}
    attn_1b = {**ATTN_360M, "n_embd": 1680, "n_head": 24, "n_layer": 36}
    counts = {"based-360m": 362_620_928, "based-1b": 1_349_453_056, "attn-360m": 359_810_048,
              "attn-1b": 1_327_080_720}  # attn-1b: MLP 4608 (GatedMlp rounding), rotary 35
    for name, cfg in (("based-360m", based), ("based-1b", based_1b), ("attn-360m", attn_360m), ("attn-1b", attn_1b)):
        config = based_repo_model_config(cfg, set())
        named = resolve_model(name)
        assert config.spec == named.spec, name
        assert (config.d_model, config.n_heads, config.padded_vocab_size) == (
            named.d_model, named.n_heads, named.padded_vocab_size), name
        assert build_model(config, device="meta").num_params() == counts[name], name
    assert "mlp:4608" in resolve_model("attn-1b").spec and "rotary_dim=35" in resolve_model("attn-1b").spec


def test_naive_reference_can_fail(tmp_path):
    """The comparison is sensitive to each fact: a window one wider, or the old rotary convention (36 over 36
    instead of 35 over 35), gives other logits."""
    for cfg, old, new in ((BASED, "swa:9", "swa:10"), (ATTN_1B, "rotary_dim=35", "rotary_dim=36")):
        sd = published_state_dict(cfg)
        model = convert_based_repo(write_checkpoint(tmp_path / old, cfg, sd))
        other = build_model(ModelConfig.from_dict({**model.config.to_dict(),
                                                   "spec": model.config.spec.replace(old, new)}))
        other.load_state_dict(model.state_dict())
        tokens = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert rel_err(other(tokens), naive_logits(cfg, sd, tokens)) > 100 * TOL, new


def test_unsupported_settings_are_refused_with_the_key_named(tmp_path):
    for change, match in (({"mixer": {**BASED["mixer"], "expand_proj": 3}}, "expand_proj = 3"),
                          ({"mlp_fc1_bias": True}, "MLP biases"),
                          ({"activation_function": "gelu_new"}, "activation_function"),
                          ({"qkv_proj_bias": True}, "attention biases"),
                          ({"rotary_emb_interleaved": True}, "interleaved"),
                          ({"mixer": {**BASED["mixer"], "_target_": "based.models.mixers.hyena.Hyena"}}, "Hyena")):
        with pytest.raises(ConversionError, match=match):
            based_repo_model_config({**BASED, **change}, set())
    r = CliRunner().invoke(main, ["convert", str(write_checkpoint(tmp_path / "odd", {**BASED, "mixer": {
        **BASED["mixer"], "expand_proj": 3}}, published_state_dict(BASED))), str(tmp_path / "out")])
    assert r.exit_code == 2 and "expand_proj = 3" in r.output and "Traceback" not in r.output


def test_kernel_sizes_plural_is_ignored_as_in_the_original(tmp_path):
    cfg = copy.deepcopy(BASED)
    cfg["mixer"]["kernel_sizes"] = 5  # swallowed by BaseConv's **kwargs: the kernel stays 3
    assert "conv:5" not in based_repo_model_config(cfg, set()).spec
    convert_based_repo(write_checkpoint(tmp_path / "k", cfg, published_state_dict(BASED)))


def test_convert_cli_writes_a_model_directory(tmp_path):
    src = write_checkpoint(tmp_path / "based", BASED)
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    loaded, direct = load(tmp_path / "out"), convert_based_repo(src)
    tokens = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), direct(tokens))


def test_mismatch_names_missing_unexpected_and_misshapen_keys(tmp_path):
    sd = published_state_dict(BASED)
    del sd["model.transformer.layers.1.mixer.proj_q.weight"]
    sd["model.transformer.layers.3.mixer.extra.weight"] = torch.zeros(2)
    sd["model.transformer.layers.5.mlp.fc2.weight"] = torch.zeros(64, 192)
    sd["model.transformer.layers.0.mixer.out_proj.weight"] = torch.zeros(64, 64)
    with pytest.raises(ConversionError) as e:
        convert_based_repo(write_checkpoint(tmp_path / "bad", BASED, sd))
    msg = str(e.value)
    assert "transformer.layers.1.mixer.proj_q.weight" in msg and "transformer.layers.3.mixer.extra.weight" in msg
    assert "transformer.layers.0.mixer.out_proj.weight: checkpoint [64, 64]" in msg
    assert "transformer.layers.5.mlp.fc2.weight: checkpoint [64, 192]" in msg
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "bad"), str(tmp_path / "out")])
    assert r.exit_code == 2 and "missing keys" in r.output and not (tmp_path / "out").exists()


def test_bin_files_are_loaded_without_unpickling_code(tmp_path):
    src = write_checkpoint(tmp_path / "evil", BASED, {"model.x": torch.zeros(1), "model.f": print})
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        convert_based_repo(src)


def test_round_trip_all_six_mixers_identical_logits_and_generation(tmp_path):
    torch.manual_seed(0)
    config = resolve_model("conv,based:feature_dim=4,swa:5,attn,mamba:4,mlp", d_model=32, n_heads=4,
                           vocab_size=61, max_seqlen=64)
    model = build_model(config)
    out = save(model, tmp_path / "m")
    loaded = load(out)
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
    model = convert_based_repo(write_checkpoint(tmp_path / "mamba", cfg, sd))
    assert model.config.spec == "mamba,mamba,mamba"
    tokens = torch.randint(0, 50, (2, 13), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(model(tokens), ref(tokens))
    with pytest.raises(ConversionError, match="LayerNorm"):
        convert_based_repo(write_checkpoint(tmp_path / "ln", {**cfg, "rms_norm": False}, sd))


def test_rotary_inv_freq_buffers_are_checked_against_the_layer(tmp_path):
    """flash-attn's inv_freq for R = 35 (18 frequencies over 35) is accepted; other frequencies are refused."""
    sd = published_state_dict(ATTN_1B)
    for i in range(2):
        sd[f"model.transformer.layers.{i}.mixer.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, 35, 2) / 35)
    model = convert_based_repo(write_checkpoint(tmp_path / "a", ATTN_1B, sd))
    assert model.blocks[0].mixer.rotary_dim == 35
    assert torch.equal(model.blocks[2].mixer.Wqkv.weight, sd["model.transformer.layers.1.mixer.Wqkv.weight"])
    sd["model.transformer.layers.0.mixer.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, 36, 2) / 36)
    with pytest.raises(ConversionError, match="rotary dim 35"):
        convert_based_repo(write_checkpoint(tmp_path / "b", ATTN_1B, sd))
