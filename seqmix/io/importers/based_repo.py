"""Import published checkpoints into seqmix: the Based repository's layout (Based hybrids, attention, Mamba).

The Based repository (HazyResearch/based) publishes `config.json` + `pytorch_model.bin` (REFERENCE.md).
Each of its layers is a mixer followed by an MLP; seqmix has one block per residual branch, so Based-repo
layer i becomes seqmix blocks 2i (the mixer, `norm1`) and 2i+1 (the MLP, `norm2`). Mamba checkpoints (the
mamba-ssm layout, `backbone.*`) have no MLP: layer i is block i.

Which mixer a Based-repo layer holds: `alt_mixer_2_layers` (sliding window) is checked first, then
`alt_mixer_layers` (Based linear attention); any other layer is BaseConv, or softmax attention when the
config has no `mixer` entry (the attention baselines). The window convention differs: the Based
repo's `window_size: w` lets a query see itself and the w//2 previous tokens, i.e. seqmix `swa:{w//2 + 1}`.

This module knows the format only (which config keys make a layer which kind, layer -> block, embedding, norms,
head, the rotary buffers); each mixer maps its own tensors (`import_weights(SOURCE, ...)`: BaseConv reshapes
`conv.conv.weight`, the others keep the Based repo's names). Loading is safe: `.bin` files go through
`torch.load(weights_only=True)`; safetensors is preferred when present; sharded checkpoints load like single files.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch

from seqmix.config import ModelConfig
from seqmix.io.files import read_config_json, read_weights
from seqmix.io.importers.common import Layout, import_checkpoint
from seqmix.io.strict import ConversionError
from seqmix.model import HybridLM
from seqmix.registry import load_registry
from seqmix.spec import format_spec, make_layer

__all__ = ["SOURCE", "based_repo_model_config", "convert_based_repo", "import_based_repo", "is_based_repo_config",
           "load_based_repo_state_dict"]

SOURCE = "based-repo"  # the name this format registers under, and the `source` mixers' import_weights see
_ROPE_BASE = 10000.0  # the Based repo's rotary base (REFERENCE.md)
_INV_FREQ = re.compile(r"transformer\.layers\.(\d+)\.mixer\.rotary_emb\.inv_freq")


# -- reading the source -------------------------------------------------------------------------------
def load_based_repo_state_dict(src_dir: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with a leading `model.` stripped and `metrics` entries dropped.

    Reads model.safetensors or pytorch_model.bin, single or sharded (seqmix.io.files.read_weights; `.bin`
    through `torch.load(weights_only=True)`, so no pickled code is ever run); a Lightning-style checkpoint's
    `state_dict` is unwrapped."""
    raw = read_weights(src_dir)
    if isinstance(raw.get("state_dict"), dict):  # a Lightning-style wrapper
        raw = raw["state_dict"]
    out = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor) or "metrics" in key:
            continue
        out[key.removeprefix("model.")] = value
    return out


def is_based_repo_config(cfg: dict[str, Any]) -> bool:
    """Every Based-repo config.json states n_layer (and names no transformers model_type seqmix imports)."""
    return "n_layer" in cfg


# -- config -> spec -----------------------------------------------------------------------------------
def _is_mamba(keys) -> bool:
    return any(k.startswith("backbone.") for k in keys)


_KINDS = {"mixer": ("conv", "BaseConv"), "alt_mixer": ("based", "LinearAttention"),
          "alt_mixer_2": ("swa", "SlidingAttention")}


def _layer_kind(cfg: dict[str, Any], i: int) -> str:
    """What the original's create_mixer_cls builds for layer i: `alt_mixer_2` for alt_mixer_2_layers (checked
    first), `alt_mixer` for alt_mixer_layers, `mixer` elsewhere; softmax attention (MHA) where that entry is
    absent, as in the attention baselines, which have no `mixer`."""
    tag = ("alt_mixer_2" if i in set(cfg.get("alt_mixer_2_layers") or ()) else
           "alt_mixer" if i in set(cfg.get("alt_mixer_layers") or ()) else "mixer")
    value = cfg.get(tag)
    if value is None:
        return "attn"
    kind, cls = _KINDS[tag]
    target = str(value.get("_target_", cls)) if isinstance(value, dict) else cls
    if target.rsplit(".", 1)[-1] != cls:
        raise ConversionError(f"layer {i}: {tag} is {target}; seqmix imports {cls} there (as the published "
                              f"Based models have it)")
    return kind


def _refuse_unsupported(cfg: dict[str, Any]) -> None:
    """Settings of the original model (GPT2Config defaults where a key is absent) seqmix cannot express."""
    checks = [
        (cfg.get("activation_function", "gelu_new") != "swiglu",
         f"activation_function {cfg.get('activation_function', 'gelu_new')!r}: seqmix's mlp is SwiGLU only"),
        (cfg.get("mlp_fc1_bias", True) or cfg.get("mlp_fc2_bias", True), "MLP biases (mlp_fc1_bias / mlp_fc2_bias)"),
        (cfg.get("rms_norm") is False, "LayerNorm blocks (rms_norm: false); seqmix blocks use RMSNorm"),
        (cfg.get("rotary_emb_interleaved", False), "interleaved rotary (rotary_emb_interleaved: true)"),
        (cfg.get("rotary_emb_scale_base") is not None, "xPos rotary scaling (rotary_emb_scale_base)"),
        (not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx", False),
         "an attention scale other than 1/sqrt(head_dim) (scale_attn_weights / scale_attn_by_inverse_layer_idx)"),
        (cfg.get("parallel_block", False) or not cfg.get("prenorm", True), "parallel or post-norm blocks"),
    ]
    for bad, what in checks:
        if bad:
            raise ConversionError(f"config.json asks for {what}, which seqmix cannot import exactly")


def _rotary(cfg: dict[str, Any], head_dim: int) -> tuple[int, float]:
    """(rotary dim R, base) of the attention layers: R = int(rotary_emb_fraction * head_dim), 0 when absent."""
    return int(float(cfg.get("rotary_emb_fraction", 0.0)) * head_dim), float(cfg.get("rotary_emb_base", _ROPE_BASE))


def _attn_args(cfg: dict[str, Any], d: int, n_head: int, kind: str) -> dict[str, Any]:
    """Args of an `attn` or `swa` layer. Both take their heads, rotary dim and base from the top-level config
    (the original overrides alt_mixer_2's num_heads with n_head): rotary dim R = int(rotary_emb_fraction *
    head_dim) (0 when the key is absent), which seqmix's rotary_dim reads as flash-attn does (2*ceil(R/2)
    channels rotated)."""
    if any(cfg.get(k, True) for k in ("qkv_proj_bias", "out_proj_bias")):
        raise ConversionError("config.json asks for attention biases (qkv_proj_bias / out_proj_bias, true unless "
                              "set to false); seqmix's attention layers have none")
    head_dim = d // n_head
    rot, base = _rotary(cfg, head_dim)
    args: dict[str, Any] = {} if rot == head_dim else {"rotary_dim": rot}
    kv = cfg.get("n_head_kv")
    if kind == "swa":
        if base != _ROPE_BASE or kv not in (None, n_head):
            raise ConversionError(f"sliding-window layers with rotary_emb_base {base:g} or n_head_kv {kv}: seqmix's "
                                  f"swa has base {_ROPE_BASE:g} and one K/V head per query head")
        return args
    if kv not in (None, n_head):
        args["kv_heads"] = int(kv)
    return args | ({} if base == _ROPE_BASE else {"rope_base": base})


def _conv_args(conv: dict[str, Any]) -> dict[str, Any]:
    """BaseConv: d_inner = expand_proj * d // 2, so seqmix's expand (inner = expand * d) is expand_proj / 2.
    The kernel size is BaseConv's `kernel_size` (default 3); `kernel_sizes` (plural, in the published configs)
    is not a constructor argument and is swallowed by its **kwargs."""
    ep = conv.get("expand_proj", 2)
    if not isinstance(ep, int) or ep < 2 or ep % 2:
        raise ConversionError(f"mixer.expand_proj = {ep!r}: BaseConv's inner width is expand_proj * d_model // 2, "
                              f"which seqmix's conv expresses for even expand_proj >= 2 only")
    if not conv.get("use_bias", True):
        raise ConversionError("mixer.use_bias = false: seqmix's conv has in_proj and out_proj biases")
    return {"kernel_size": int(conv.get("kernel_size", 3)), "expand": ep // 2}


def based_repo_model_config(cfg: dict[str, Any], keys, registry=None) -> ModelConfig:
    """The seqmix ModelConfig (canonical spec) of a Based-repo `config.json` whose checkpoint holds `keys`.

    Keys the config leaves out take GPT2Config's defaults, as in the original (vocab 50257, 12 heads). Mamba's
    dt_rank is read from the tensor shapes when `keys` is a {name: tensor} mapping."""
    registry = registry or load_registry()
    shapes = {k: tuple(v.shape) for k, v in keys.items()} if isinstance(keys, dict) else {}
    d = int(cfg.get("n_embd", cfg.get("d_model", 0)))
    n_layer = int(cfg["n_layer"])
    n_head = int(cfg.get("n_head") or 12)
    if d <= 0:
        raise ConversionError("config.json gives no model width (n_embd or d_model)")
    layers = []
    if _is_mamba(keys):
        if cfg.get("rms_norm") is False:
            raise ConversionError("this Mamba checkpoint uses LayerNorm (rms_norm: false); seqmix blocks use "
                                  "RMSNorm, so it cannot be imported exactly")
        ssm = cfg.get("ssm_cfg") or {}
        args: dict[str, Any] = {"d_state": ssm.get("d_state", 16), "expand": ssm.get("expand", 2),
                                "d_conv": ssm.get("d_conv", 4)}
        if ssm.get("dt_rank", "auto") != "auto":
            args["dt_rank"] = ssm["dt_rank"]
        if (s := shapes.get("backbone.layers.0.mixer.dt_proj.weight")) and s[1] != math.ceil(d / 16):
            args["dt_rank"] = s[1]
        layers = [make_layer("mamba", args, registry)] * n_layer
        eps = cfg.get("norm_epsilon", cfg.get("layer_norm_epsilon", 1e-5))
    else:
        _refuse_unsupported(cfg)
        alt, conv = cfg.get("alt_mixer") or {}, cfg.get("mixer") or {}
        fmap = alt.get("feature_map", alt.get("feature_name", "taylor_exp"))
        fmap = str(fmap.get("_target_", fmap) if isinstance(fmap, dict) else fmap)
        hidden = gated_mlp_hidden(cfg, d)
        for i in range(n_layer):
            kind = _layer_kind(cfg, i)
            if kind == "swa":
                args = {"window": int((cfg.get("alt_mixer_2") or {}).get("window_size", 128)) // 2 + 1}
                args |= _attn_args(cfg, d, n_head, "swa")
            elif kind == "based":
                if "taylor" not in fmap.lower():
                    raise ConversionError(f"layer {i}: feature map {fmap!r} is not supported; seqmix's `based` "
                                          f"mixer implements the Taylor map (TaylorExp) only")
                heads = alt.get("num_heads", n_head)
                args = {"feature_dim": alt.get("feature_dim", 16)}
                args.update({} if heads == n_head else {"heads": heads})
            elif kind == "attn":
                args = _attn_args(cfg, d, n_head, "attn")
            else:
                args = _conv_args(conv)
            layers += [make_layer(kind, args, registry),
                       make_layer("mlp", {} if hidden == 2 * d else {"hidden": hidden}, registry)]
        eps = cfg.get("layer_norm_epsilon", 1e-5)
    return ModelConfig(
        spec=format_spec(layers, registry), d_model=d, n_heads=n_head, vocab_size=int(cfg.get("vocab_size", 50257)),
        pad_vocab_multiple=int(cfg.get("pad_vocab_size_multiple", 1)), norm_eps=float(eps),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", cfg.get("tie_embeddings", True))),
    )


def gated_mlp_hidden(cfg: dict[str, Any], d: int) -> int:
    """flash-attn's GatedMlp width: n_inner if the config sets it, else int(8 * d / 3), rounded UP to a multiple
    of 256 (attn-360m: 2730 -> 2816; attn-1b: 4480 -> 4608; the Based hybrids' n_inner = 2d stays)."""
    h = int(cfg["n_inner"]) if cfg.get("n_inner") is not None else int(8 * d / 3)
    return -(-h // 256) * 256


# -- weights ------------------------------------------------------------------------------------------
def _checked_rotary_buffers(sd: dict[str, torch.Tensor], cfg: dict[str, Any], config: ModelConfig) -> set[str]:
    """The attention layers' flash-attn `rotary_emb.inv_freq` buffers, which seqmix recomputes: refuse ones that
    are not 1 / base^(arange(0, R, 2) / R) for the R and base config.json gives (what seqmix's layer was built
    with); return their keys. Another layer's buffer is left to be reported as unexpected."""
    R, base = _rotary(cfg, config.d_model // config.n_heads)
    want = 1.0 / base ** (torch.arange(0, R, 2, dtype=torch.float64) / R) if R else torch.zeros(0)
    checked = set()
    for key, inv in sd.items():
        m = _INV_FREQ.fullmatch(key)
        if m is None or _layer_kind(cfg, int(m.group(1))) not in ("attn", "swa"):
            continue
        if inv.shape != want.shape or not torch.allclose(inv.double(), want, rtol=1e-4):
            raise ConversionError(f"{key} is not the rotary frequencies of base {base:g} over rotary dim {R} "
                                  f"(from rotary_emb_fraction in config.json); seqmix cannot import a different "
                                  f"rotary embedding")
        checked.add(key)
    return checked


def based_repo_layout(cfg: dict[str, Any], config: ModelConfig, mamba: bool) -> Layout:
    """Where the Based repo keeps what: layer i is blocks 2i (`mixer`, norm1) and 2i+1 (`mlp`, norm2); in the
    mamba-ssm layout (`backbone.*`) layer i is block i."""
    n = int(cfg["n_layer"])
    if mamba:
        return Layout(embed="backbone.embedding.weight", names={"norm_f.weight": "backbone.norm_f.weight"} | {
            f"blocks.{i}.norm.weight": f"backbone.layers.{i}.norm.weight" for i in range(n)},
            mixers={i: f"backbone.layers.{i}.mixer." for i in range(n)})
    layout = Layout(embed="transformer.embeddings.word_embeddings.weight",
                    names={"norm_f.weight": "transformer.ln_f.weight"})
    for i in range(n):
        layout.names |= {f"blocks.{2 * i}.norm.weight": f"transformer.layers.{i}.norm1.weight",
                         f"blocks.{2 * i + 1}.norm.weight": f"transformer.layers.{i}.norm2.weight"}
        layout.mixers |= {2 * i: f"transformer.layers.{i}.mixer.", 2 * i + 1: f"transformer.layers.{i}.mlp."}
    return layout


def import_based_repo(directory: Path, cfg: dict[str, Any], registry) -> HybridLM:
    """The importer registered for Based-repo checkpoints (seqmix.io.load calls it): a CPU HybridLM."""
    sd = load_based_repo_state_dict(directory)
    config = based_repo_model_config(cfg, sd, registry)
    mamba = _is_mamba(sd)
    if not mamba:
        rotary = _checked_rotary_buffers(sd, cfg, config)
        sd = {k: v for k, v in sd.items() if k not in rotary}
    return import_checkpoint(
        config, sd, based_repo_layout(cfg, config, mamba), source=SOURCE, what=str(directory), registry=registry,
        hint="Check alt_mixer_layers / alt_mixer_2_layers and the mixer sizes in config.json against the weights.")


def convert_based_repo(src_dir: Union[str, Path], *, registry=None, dtype: Optional[torch.dtype] = None):
    """A HybridLM holding the Based-repo checkpoint in `src_dir` (config.json + pytorch_model.bin).

    Covers the Based hybrids (BaseConv / Taylor linear attention / sliding window + SwiGLU MLPs), the
    attention baselines (softmax attention + MLP) and Mamba stacks (mamba-ssm `backbone.*` keys). Logits over
    the real vocabulary match the source model; the padded vocabulary rows are kept but never returned.
    Raises ConversionError naming the missing, unexpected and misshapen keys when config and weights disagree.
    """
    cfg = read_config_json(src_dir, "a Based-repo checkpoint directory has config.json and pytorch_model.bin")
    model = import_based_repo(Path(src_dir), cfg, registry or load_registry())
    return model.to(dtype) if dtype is not None else model
