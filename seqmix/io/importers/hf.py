"""Import Hugging Face transformers checkpoints into seqmix: LlamaForCausalLM (attn/mlp) and MambaForCausalLM (mamba).

Llama layer i becomes seqmix blocks 2i (`attn`: `self_attn.*`, norm = input_layernorm) and 2i+1 (`mlp`: `mlp.*`,
norm = post_attention_layernorm); the mixers fuse their own projections (`import_weights("llama", ...)`: attn's
Wqkv from q/k/v_proj, mlp's fc1 from up/gate_proj). Llama's RoPE is rotate-half over the full head dim, as seqmix's
`attn`. Mamba layer i is block i (`mixer.*`, names that seqmix's mamba shares with transformers and mamba-ssm).
This module knows the formats only: config keys, layer -> block, embedding, norms, head.

The vocabulary is padded to `pad_vocab_multiple` with zero rows (embedding and untied head); seqmix never
returns the padded logits, so logits over the real vocabulary equal the source model's.
Weights are read from safetensors (single file or sharded index); `.bin` only through
`torch.load(weights_only=True)`. Anything seqmix cannot express exactly is refused with a ConversionError.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Union

import torch

from seqmix.config import ModelConfig
from seqmix.io.files import read_config_json, read_weights
from seqmix.io.importers.common import Layout, import_checkpoint
from seqmix.io.strict import ConversionError
from seqmix.model import HybridLM
from seqmix.registry import load_registry
from seqmix.spec import format_spec, make_layer

__all__ = ["convert_llama", "convert_mamba_hf", "import_llama", "import_mamba", "llama_model_config",
           "load_hf_checkpoint", "mamba_model_config"]

Source = Union[str, Path, torch.nn.Module]  # a save_pretrained directory or an in-memory transformers model


# -- reading the source -------------------------------------------------------------------------------
def load_hf_checkpoint(src: Source) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json as a dict, the tensors) of a transformers model directory or model object.

    A directory may hold model.safetensors, a sharded model.safetensors.index.json, pytorch_model.bin or a
    sharded pytorch_model.bin.index.json; `.bin` files are read with `torch.load(weights_only=True)`."""
    if isinstance(src, torch.nn.Module):
        if not hasattr(src, "config"):
            raise TypeError(f"{type(src).__name__} has no .config; pass a transformers model or a directory")
        return src.config.to_dict(), {k: v.detach() for k, v in src.state_dict().items()}
    cfg = read_config_json(src, "pass a directory written by transformers' save_pretrained")
    return cfg, read_weights(src)


def _refuse(cfg: dict[str, Any], what: str, **want: Any) -> None:
    """Raise unless every config key in `want` is absent or has the stated value."""
    for key, value in want.items():
        if cfg.get(key, value) != value:
            raise ConversionError(f"{what}: config.json has {key}={cfg[key]!r}; seqmix can only import "
                                  f"{key}={value!r} exactly")


# -- Llama --------------------------------------------------------------------------------------------
def _rope_base(cfg: dict[str, Any]) -> float:
    """RoPE theta from transformers 5's `rope_parameters` or 4's `rope_theta`/`rope_scaling`; plain RoPE only."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ConversionError(f"rope_type {kind!r} (RoPE scaling) is not supported; seqmix's attn implements "
                              f"plain RoPE only (rope_type 'default')")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError("partial_rotary_factor != 1 is not supported for Llama checkpoints")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def llama_model_config(cfg: dict[str, Any], *, pad_vocab_multiple: int = 8, registry=None) -> ModelConfig:
    """The seqmix ModelConfig of a LlamaForCausalLM `config.json` (a dict)."""
    registry = registry or load_registry()
    what = "LlamaForCausalLM"
    _refuse(cfg, what, hidden_act="silu", attention_bias=False, mlp_bias=False)
    d, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or d // heads)
    if head_dim * heads != d:
        raise ConversionError(f"{what}: head_dim {head_dim} x {heads} heads != hidden_size {d}; seqmix's attn "
                              f"uses head dim = d_model / heads")
    args: dict[str, Any] = {"kv_heads": kv} if kv != heads else {}
    base = _rope_base(cfg)
    args.update({} if base == 10000.0 else {"rope_base": base})
    hidden = int(cfg["intermediate_size"])
    layer = [make_layer("attn", args, registry),
             make_layer("mlp", {} if hidden == 2 * d else {"hidden": hidden}, registry)]
    return ModelConfig(
        spec=format_spec(layer * int(cfg["num_hidden_layers"]), registry), d_model=d, n_heads=heads,
        vocab_size=int(cfg["vocab_size"]), pad_vocab_multiple=pad_vocab_multiple,
        max_seqlen=int(cfg.get("max_position_embeddings", 2048)), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def import_llama(directory: Path, cfg: dict[str, Any], registry) -> HybridLM:
    """The importer registered for model_type "llama": a CPU HybridLM from a LlamaForCausalLM directory."""
    return _llama(cfg, read_weights(directory), registry)


def _llama(cfg: dict[str, Any], sd: dict[str, torch.Tensor], registry, pad_vocab_multiple: int = 8) -> HybridLM:
    registry = registry or load_registry()
    config = llama_model_config(cfg, pad_vocab_multiple=pad_vocab_multiple, registry=registry)
    n = int(cfg["num_hidden_layers"])
    layout = Layout(embed="model.embed_tokens.weight", names={"norm_f.weight": "model.norm.weight"})
    for i in range(n):
        layout.names |= {f"blocks.{2 * i}.norm.weight": f"model.layers.{i}.input_layernorm.weight",
                         f"blocks.{2 * i + 1}.norm.weight": f"model.layers.{i}.post_attention_layernorm.weight"}
        layout.mixers |= {2 * i: f"model.layers.{i}.self_attn.", 2 * i + 1: f"model.layers.{i}.mlp."}
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}  # recomputed from rope_theta
    return import_checkpoint(config, sd, layout, source="llama", what="LlamaForCausalLM checkpoint",
                             registry=registry, pad_vocab=True)


def convert_llama(src: Source, *, pad_vocab_multiple: int = 8, registry=None) -> HybridLM:
    """A HybridLM (`attn`/`mlp` blocks) holding a transformers LlamaForCausalLM (directory or model object).

    Logits over the real vocabulary match the source. Refused (ConversionError): RoPE scaling (Llama 3.1
    `rope_type: llama3`, linear, dynamic, yarn), biases, a head_dim other than hidden_size/heads, any
    activation but silu, and keys the mapping does not consume."""
    cfg, sd = load_hf_checkpoint(src)
    return _llama(cfg, sd, registry, pad_vocab_multiple)


# -- Mamba --------------------------------------------------------------------------------------------
def mamba_model_config(cfg: dict[str, Any], *, pad_vocab_multiple: int = 8, registry=None) -> ModelConfig:
    """The seqmix ModelConfig of a MambaForCausalLM `config.json` (a dict)."""
    registry = registry or load_registry()
    what = "MambaForCausalLM"
    _refuse(cfg, what, hidden_act="silu", use_bias=False)
    d = int(cfg["hidden_size"])
    inner = int(cfg.get("intermediate_size") or int(cfg.get("expand", 2)) * d)
    if inner % d:
        raise ConversionError(f"{what}: intermediate_size {inner} is not a multiple of hidden_size {d}; "
                              f"seqmix's mamba has inner width expand * d_model with an integer expand")
    args: dict[str, Any] = {"d_state": int(cfg.get("state_size", 16)), "expand": inner // d,
                            "d_conv": int(cfg.get("conv_kernel", 4))}
    rank = cfg.get("time_step_rank", "auto")
    rank = math.ceil(d / 16) if rank == "auto" else int(rank)
    args.update({} if rank == math.ceil(d / 16) else {"dt_rank": rank})
    return ModelConfig(
        spec=format_spec([make_layer("mamba", args, registry)] * int(cfg["num_hidden_layers"]), registry),
        d_model=d, n_heads=1, vocab_size=int(cfg["vocab_size"]), pad_vocab_multiple=pad_vocab_multiple,
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
    )


def import_mamba(directory: Path, cfg: dict[str, Any], registry) -> HybridLM:
    """The importer registered for model_type "mamba": a CPU HybridLM from a MambaForCausalLM directory."""
    return _mamba(cfg, read_weights(directory), registry)


def _mamba(cfg: dict[str, Any], sd: dict[str, torch.Tensor], registry, pad_vocab_multiple: int = 8) -> HybridLM:
    registry = registry or load_registry()
    config = mamba_model_config(cfg, pad_vocab_multiple=pad_vocab_multiple, registry=registry)
    n = int(cfg["num_hidden_layers"])
    layout = Layout(embed="backbone.embeddings.weight", names={"norm_f.weight": "backbone.norm_f.weight"},
                    mixers={i: f"backbone.layers.{i}.mixer." for i in range(n)})
    layout.names |= {f"blocks.{i}.norm.weight": f"backbone.layers.{i}.norm.weight" for i in range(n)}
    if cfg.get("use_conv_bias") is False:  # transformers' MambaMixer then has no conv1d.bias: the bias is zero
        inner = int(cfg.get("intermediate_size") or int(cfg.get("expand", 2)) * config.d_model)
        sd = {f"backbone.layers.{i}.mixer.conv1d.bias": torch.zeros(inner) for i in range(n)} | sd
    return import_checkpoint(config, sd, layout, source="mamba", what="MambaForCausalLM checkpoint",
                             registry=registry, pad_vocab=True)


def convert_mamba_hf(src: Source, *, pad_vocab_multiple: int = 8, registry=None) -> HybridLM:
    """A HybridLM (`mamba` blocks) holding a transformers MambaForCausalLM (directory or model object).

    A checkpoint without conv biases (use_conv_bias: false) gets zero biases. Refused (ConversionError):
    in/out projection biases (use_bias: true), an activation other than silu, a non-integer expand."""
    cfg, sd = load_hf_checkpoint(src)
    return _mamba(cfg, sd, registry, pad_vocab_multiple)
