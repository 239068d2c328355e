"""Import Hugging Face transformers checkpoints into seqmix: LlamaForCausalLM (attn/mlp) and MambaForCausalLM (mamba).

Llama layer i becomes seqmix blocks 2i (`attn`, norm = input_layernorm) and 2i+1 (`mlp`, norm =
post_attention_layernorm). The fused projections are built from the separate ones:
    Wqkv = [q_proj | k_proj | v_proj]   (rows; GQA keeps num_key_value_heads K/V heads)
    fc1  = [up_proj | gate_proj]        (seqmix's SwiGLU is fc2(silu(second half) * first half))
Llama's RoPE is rotate-half over the full head dim, as seqmix's `attn`. Mamba layer i is block i, and the
mixer's parameter names are transformers' own (mamba-ssm's), so only the prefixes change.

The vocabulary is padded to `pad_vocab_multiple` with zero rows (embedding and untied head); seqmix never
returns the padded logits, so logits over the real vocabulary equal the source model's.
Weights are read from safetensors (single file or sharded index); `.bin` only through
`torch.load(weights_only=True)`. Anything seqmix cannot express exactly is refused with a ConversionError.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Union

import torch

from seqmix.checkpoint import read_weights
from seqmix.config import ModelConfig
from seqmix.convert import ConversionError

__all__ = ["convert_llama", "convert_mamba_hf", "load_hf_checkpoint", "llama_model_config", "mamba_model_config"]

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
    path = Path(src)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} not found: pass a directory written by save_pretrained")
    cfg = json.loads((path / "config.json").read_text())
    return cfg, read_weights(path)


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
    from seqmix.spec import format_spec, make_layer

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


def _llama_tensors(sd: dict[str, torch.Tensor], n_layer: int) -> tuple[dict[str, torch.Tensor], set[str]]:
    """seqmix names -> tensors built from the Llama names, and the source names used."""
    out, used = {}, set()

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise ConversionError(f"LlamaForCausalLM checkpoint lacks {key!r} (its config says "
                                  f"{n_layer} layers); is it complete?")
        used.add(key)
        return sd[key]

    out["embed.weight"], out["norm_f.weight"] = take("model.embed_tokens.weight"), take("model.norm.weight")
    for i in range(n_layer):
        p, a, m = f"model.layers.{i}.", f"blocks.{2 * i}.", f"blocks.{2 * i + 1}."
        out[a + "norm.weight"] = take(p + "input_layernorm.weight")
        out[a + "mixer.Wqkv.weight"] = torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        out[a + "mixer.out_proj.weight"] = take(p + "self_attn.o_proj.weight")
        out[m + "norm.weight"] = take(p + "post_attention_layernorm.weight")
        out[m + "mixer.fc1.weight"] = torch.cat([take(p + "mlp.up_proj.weight"), take(p + "mlp.gate_proj.weight")])
        out[m + "mixer.fc2.weight"] = take(p + "mlp.down_proj.weight")
    return out, used


def convert_llama(src: Source, *, pad_vocab_multiple: int = 8, registry=None):
    """A HybridLM (`attn`/`mlp` blocks) holding a transformers LlamaForCausalLM (directory or model object).

    Logits over the real vocabulary match the source. Refused (ConversionError): RoPE scaling (Llama 3.1
    `rope_type: llama3`, linear, dynamic, yarn), biases, a head_dim other than hidden_size/heads, any
    activation but silu, and keys the mapping does not consume."""
    cfg, sd = load_hf_checkpoint(src)
    config = llama_model_config(cfg, pad_vocab_multiple=pad_vocab_multiple, registry=registry)
    mapped, used = _llama_tensors(sd, int(cfg["num_hidden_layers"]))
    _head(sd, mapped, used, config, "model.embed_tokens.weight")
    return _load(config, mapped, sd, used, "LlamaForCausalLM", registry,
                 ignore=lambda k: k.endswith("rotary_emb.inv_freq"))


# -- Mamba --------------------------------------------------------------------------------------------
def mamba_model_config(cfg: dict[str, Any], *, pad_vocab_multiple: int = 8, registry=None) -> ModelConfig:
    """The seqmix ModelConfig of a MambaForCausalLM `config.json` (a dict)."""
    from seqmix.spec import format_spec, make_layer

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


def convert_mamba_hf(src: Source, *, pad_vocab_multiple: int = 8, registry=None):
    """A HybridLM (`mamba` blocks) holding a transformers MambaForCausalLM (directory or model object).

    A checkpoint without conv biases (use_conv_bias: false) gets zero biases. Refused (ConversionError):
    in/out projection biases (use_bias: true), an activation other than silu, a non-integer expand."""
    cfg, sd = load_hf_checkpoint(src)
    config = mamba_model_config(cfg, pad_vocab_multiple=pad_vocab_multiple, registry=registry)
    n_layer = int(cfg["num_hidden_layers"])
    mapped: dict[str, torch.Tensor] = {}
    for key in sd:
        if key.startswith("backbone.layers."):
            mapped["blocks." + key.removeprefix("backbone.layers.")] = sd[key]
    renames = {"backbone.embeddings.weight": "embed.weight", "backbone.norm_f.weight": "norm_f.weight"}
    mapped.update({new: sd[old] for old, new in renames.items() if old in sd})
    used = {k for k in sd if k.startswith("backbone.layers.")} | (set(renames) & set(sd))
    if cfg.get("use_conv_bias") is False:
        inner = int(cfg.get("intermediate_size") or int(cfg.get("expand", 2)) * config.d_model)
        for i in range(n_layer):
            mapped.setdefault(f"blocks.{i}.mixer.conv1d.bias", torch.zeros(inner))
    _head(sd, mapped, used, config, "backbone.embeddings.weight")
    return _load(config, mapped, sd, used, "MambaForCausalLM", registry)


# -- shared -------------------------------------------------------------------------------------------
def _head(sd, mapped, used, config: ModelConfig, embed_key: str) -> None:
    """Map lm_head.weight when untied; when tied, accept a stored copy only if it equals the embedding."""
    if "lm_head.weight" not in sd:
        if not config.tie_embeddings:
            raise ConversionError("the config unties the LM head (tie_word_embeddings: false) but the "
                                  "checkpoint holds no lm_head.weight")
        return
    used.add("lm_head.weight")
    if not config.tie_embeddings:
        mapped["lm_head.weight"] = sd["lm_head.weight"]
    elif embed_key in sd and not torch.equal(sd["lm_head.weight"], sd[embed_key]):
        raise ConversionError(f"lm_head.weight differs from {embed_key} but tie_word_embeddings is true; "
                              f"refusing to drop the head")


def _load(config: ModelConfig, mapped, sd, used, what: str, registry, ignore=lambda k: False):
    """Build the model, zero-pad the vocabulary rows, and load strictly (naming every mismatch)."""
    from seqmix.model import build_model

    model = build_model(config, device="cpu", registry=registry)
    expected = model.state_dict()
    unexpected = sorted(k for k in set(sd) - used if not ignore(k))
    unexpected += sorted(f"{k} (seqmix name; no such parameter)" for k in set(mapped) - set(expected))
    missing = sorted(set(expected) - set(mapped))
    shapes = []
    for name in ("embed.weight", "lm_head.weight"):
        t = mapped.get(name)
        if t is not None and t.dim() == 2 and t.shape[0] == config.vocab_size < config.padded_vocab_size:
            mapped[name] = torch.cat([t, t.new_zeros(config.padded_vocab_size - config.vocab_size, t.shape[1])])
    for name, want in expected.items():
        if name in mapped and mapped[name].shape != want.shape:
            shapes.append(f"{name}: checkpoint {list(mapped[name].shape)} vs seqmix {list(want.shape)}")
    if missing or unexpected or shapes:
        raise ConversionError(
            f"{what} checkpoint does not match the model its config describes ({config.spec}):\n"
            f"  missing (seqmix names): {missing or 'none'}\n  unexpected keys: {unexpected or 'none'}\n"
            f"  shape mismatches: {shapes or 'none'}")
    model.load_state_dict({k: mapped[k].to(v.dtype) for k, v in expected.items()})
    return model
