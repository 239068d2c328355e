"""Import published checkpoints into seqmix: the Based repository's layout (Based hybrids, attention, Mamba).

The Based repository (HazyResearch/based) publishes `config.json` + `pytorch_model.bin` (REFERENCE.md).
Each of its layers is a mixer followed by an MLP; seqmix has one block per residual branch, so Based-repo
layer i becomes seqmix blocks 2i (the mixer, `norm1`) and 2i+1 (the MLP, `norm2`). Mamba checkpoints (the
mamba-ssm layout, `backbone.*`) have no MLP: layer i is block i.

Which mixer a Based-repo layer holds: `alt_mixer_2_layers` (sliding window) is checked first, then
`alt_mixer_layers` (Based linear attention); any other layer is BaseConv, or softmax attention when the
checkpoint holds `mixer.Wqkv` for it (the attention baselines). The window convention differs: the Based
repo's `window_size: w` lets a query see itself and the w//2 previous tokens, i.e. seqmix `swa:{w//2 + 1}`.

Loading is safe: `.bin` files go through `torch.load(weights_only=True)`; safetensors is preferred when present;
sharded checkpoints (`*.index.json`) load like single files.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from seqmix.config import ModelConfig

__all__ = ["convert_checkpoint", "convert_based_repo", "based_repo_model_config", "load_based_repo_state_dict", "ConversionError"]

_LAYER = re.compile(r"blocks\.(\d+)\.(norm|mixer)\.(.+)")
_ROPE_BASE = 10000.0  # the Based repo's rotary base (REFERENCE.md)


class ConversionError(ValueError):
    """A source checkpoint that does not fit the layout its config describes (or that seqmix cannot express)."""


# -- reading the source -------------------------------------------------------------------------------
def load_based_repo_state_dict(src_dir: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with a leading `model.` stripped and `metrics` entries dropped.

    Reads model.safetensors or pytorch_model.bin, single or sharded (seqmix.checkpoint.read_weights; `.bin`
    through `torch.load(weights_only=True)`, so no pickled code is ever run); a Lightning-style checkpoint's
    `state_dict` is unwrapped."""
    from seqmix.checkpoint import read_weights

    raw = read_weights(src_dir)
    if isinstance(raw.get("state_dict"), dict):  # a Lightning-style wrapper
        raw = raw["state_dict"]
    out = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor) or "metrics" in key:
            continue
        out[key.removeprefix("model.")] = value
    return out


def _read_config(src_dir: Union[str, Path]) -> dict[str, Any]:
    path = Path(src_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Based-repo checkpoint directory has config.json "
                                f"and pytorch_model.bin")
    return json.loads(path.read_text())


# -- config -> spec -----------------------------------------------------------------------------------
def _is_mamba(keys) -> bool:
    return any(k.startswith("backbone.") for k in keys)


def _layer_kind(cfg: dict[str, Any], i: int, keys) -> str:
    if i in set(cfg.get("alt_mixer_2_layers") or ()):
        return "swa"
    if i in set(cfg.get("alt_mixer_layers") or ()):
        return "based"
    return "attn" if f"transformer.layers.{i}.mixer.Wqkv.weight" in keys else "conv"


def based_repo_model_config(cfg: dict[str, Any], keys, registry=None) -> ModelConfig:
    """The seqmix ModelConfig (canonical spec) of a Based-repo `config.json` whose checkpoint holds `keys`.

    Sizes the config does not state (MLP hidden width, Mamba's inner sizes) are read from the tensor shapes
    in `keys` when `keys` is a {name: tensor} mapping; with a plain collection of names the config's values
    (or the published defaults) are used."""
    from seqmix.registry import load_registry
    from seqmix.spec import format_spec, make_layer

    registry = registry or load_registry()
    shapes = {k: tuple(v.shape) for k, v in keys.items()} if isinstance(keys, dict) else {}
    d = int(cfg.get("n_embd", cfg.get("d_model", 0)))
    n_layer = int(cfg["n_layer"])
    n_head = int(cfg.get("n_head") or 16)
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
        alt, alt2, conv = cfg.get("alt_mixer") or {}, cfg.get("alt_mixer_2") or {}, cfg.get("mixer") or {}
        fmap = str(alt.get("feature_map", alt.get("feature_name", "taylor_exp")))
        for i in range(n_layer):
            kind = _layer_kind(cfg, i, keys)
            if kind == "swa":
                heads = alt2.get("num_heads", n_head)
                args = {"window": int(alt2.get("window_size", 256)) // 2 + 1}
                args.update({} if heads == n_head else {"heads": heads})
            elif kind == "based":
                if "taylor" not in fmap.lower():
                    raise ConversionError(f"layer {i}: feature map {fmap!r} is not supported; seqmix's `based` "
                                          f"mixer implements the Taylor map (taylor_exp) only")
                heads = alt.get("num_heads", n_head)
                args = {"feature_dim": alt.get("feature_dim", 16)}
                args.update({} if heads == n_head else {"heads": heads})
            elif kind == "attn":
                rot = cfg.get("rotary_emb_dim")
                rot = None if rot is None else int(rot) + int(rot) % 2  # an odd rotary dim rotates one more
                args = {} if rot is None or rot == d // n_head else {"rotary_dim": rot}
                base = float(cfg.get("rotary_emb_base", _ROPE_BASE))
                args.update({} if base == _ROPE_BASE else {"rope_base": base})
            else:
                args = {"kernel_size": conv.get("kernel_size", 3), "expand": conv.get("expand_proj", 2)}
            hidden = _mlp_hidden(cfg, i, d, shapes)
            layers += [make_layer(kind, args, registry),
                       make_layer("mlp", {} if hidden == 2 * d else {"hidden": hidden}, registry)]
        eps = cfg.get("layer_norm_epsilon", 1e-5)
    return ModelConfig(
        spec=format_spec(layers, registry), d_model=d, n_heads=n_head, vocab_size=int(cfg["vocab_size"]),
        pad_vocab_multiple=int(cfg.get("pad_vocab_size_multiple", 1)), norm_eps=float(eps),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", cfg.get("tie_embeddings", True))),
    )


def _mlp_hidden(cfg: dict[str, Any], i: int, d: int, shapes: dict[str, tuple]) -> int:
    """The MLP's hidden width: config.json's n_inner, else fc2's weight [d, hidden] when known, else 2*d.
    (A checkpoint that disagrees with n_inner is then reported with every other mismatch.)"""
    if cfg.get("n_inner") is not None:
        return int(cfg["n_inner"])
    s = shapes.get(f"transformer.layers.{i}.mlp.fc2.weight")
    return s[1] if s is not None and len(s) == 2 else 2 * d


# -- weights ------------------------------------------------------------------------------------------
def _source_key(target: str, mamba: bool) -> tuple[str, Optional[Callable[[torch.Tensor], torch.Tensor]]]:
    """The source checkpoint's name for seqmix parameter `target`, and the reshape it needs (if any)."""
    if target == "embed.weight":
        return ("backbone.embedding.weight" if mamba else "transformer.embeddings.word_embeddings.weight"), None
    if target == "norm_f.weight":
        return ("backbone.norm_f.weight" if mamba else "transformer.ln_f.weight"), None
    if target == "lm_head.weight":
        return "lm_head.weight", None
    m = _LAYER.fullmatch(target)
    if m is None:
        raise ConversionError(f"seqmix parameter {target!r} has no counterpart in the Based-repo layout")
    b, part, rest = int(m.group(1)), m.group(2), m.group(3)
    if mamba:
        return f"backbone.layers.{b}.{part}.{rest}", None
    layer, is_mlp = divmod(b, 2)
    prefix = f"transformer.layers.{layer}."
    if part == "norm":
        return prefix + ("norm2." if is_mlp else "norm1.") + rest, None
    if is_mlp:
        return prefix + "mlp." + rest, None
    if rest == "conv_weight":  # nn.Conv1d's depthwise [C, 1, K] -> seqmix's [C, K]
        return prefix + "mixer.conv.conv.weight", lambda w: w.squeeze(1) if w.dim() == 3 else w
    return prefix + "mixer." + rest, None


def _check_rotary_buffers(sd: dict[str, torch.Tensor], base: float) -> None:
    """Rotary `inv_freq` buffers are recomputed by seqmix; refuse ones that are not RoPE of `base`."""
    for key, inv in sd.items():
        if key.endswith("rotary_emb.inv_freq"):
            dim = 2 * inv.numel()
            want = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
            if not torch.allclose(inv.double(), want, rtol=1e-4):
                raise ConversionError(f"{key} is not the rotary frequencies of base {base:g} over "
                                      f"{dim} dims; seqmix cannot import a different rotary embedding")


def _map_state_dict(model, sd: dict[str, torch.Tensor], mamba: bool, src: str, rope_base: float = _ROPE_BASE) -> dict[str, torch.Tensor]:
    """Rename and reshape `sd` onto `model`'s parameter names; name every missing/unexpected/misshapen key."""
    expected = model.state_dict()
    tied_head = "lm_head.weight" not in expected
    consumed, out, missing, shapes = set(), {}, [], []
    for target, want in expected.items():
        key, fix = _source_key(target, mamba)
        if key not in sd:
            missing.append(f"{key} (-> {target})")
            continue
        consumed.add(key)
        t = fix(sd[key]) if fix else sd[key]
        if t.shape != want.shape:
            shapes.append(f"{key}: checkpoint {list(sd[key].shape)} vs seqmix {target} {list(want.shape)}")
            continue
        out[target] = t.to(want.dtype)
    for key in sorted(set(sd) - consumed):
        if tied_head and key == "lm_head.weight":
            emb = "backbone.embedding.weight" if mamba else "transformer.embeddings.word_embeddings.weight"
            if emb in sd and sd[emb].shape == sd[key].shape and not torch.equal(sd[emb], sd[key]):
                raise ConversionError(f"{src}: lm_head.weight differs from {emb}, but the model ties its head "
                                      f"to the embedding (tie_word_embeddings); refusing to drop the head")
            consumed.add(key)
        elif key.endswith("rotary_emb.inv_freq"):
            consumed.add(key)
    _check_rotary_buffers(sd, rope_base)
    unexpected = sorted(set(sd) - consumed)
    if missing or unexpected or shapes:
        raise ConversionError(
            f"{src} does not match the model its config.json describes ({model.config.spec}):\n"
            f"  missing keys: {missing or 'none'}\n  unexpected keys: {unexpected or 'none'}\n"
            f"  shape mismatches: {shapes or 'none'}\n"
            f"Check alt_mixer_layers / alt_mixer_2_layers and the mixer sizes in config.json against the weights.")
    return out


def convert_based_repo(src_dir: Union[str, Path], *, registry=None, dtype: Optional[torch.dtype] = None):
    """A HybridLM holding the Based-repo checkpoint in `src_dir` (config.json + pytorch_model.bin).

    Covers the Based hybrids (BaseConv / Taylor linear attention / sliding window + SwiGLU MLPs), the
    attention baselines (softmax attention + MLP) and Mamba stacks (mamba-ssm `backbone.*` keys). Logits over
    the real vocabulary match the source model; the padded vocabulary rows are kept but never returned.
    Raises ConversionError naming the missing, unexpected and misshapen keys when config and weights disagree.
    """
    from seqmix.model import build_model
    from seqmix.registry import load_registry

    registry = registry or load_registry()
    cfg = _read_config(src_dir)
    sd = load_based_repo_state_dict(src_dir)
    config = based_repo_model_config(cfg, sd, registry)
    model = build_model(config, device="cpu", registry=registry)
    model.load_state_dict(_map_state_dict(model, sd, _is_mamba(sd), str(src_dir),
                                          float(cfg.get("rotary_emb_base", _ROPE_BASE))))
    return model.to(dtype) if dtype is not None else model


def convert_checkpoint(src: Union[str, Path], *, registry=None, revision: Optional[str] = None,
                       cache_dir: Optional[Union[str, Path]] = None, local_files_only: bool = False):
    """A HybridLM holding the checkpoint in `src`, a directory or a Hugging Face hub name "org/name" (fetched
    by seqmix.checkpoint.resolve_model_dir with `revision`, `cache_dir`, `local_files_only`). The format is read
    from config.json: `model_type` "llama" (LlamaForCausalLM) or "mamba" (MambaForCausalLM) go through
    seqmix.convert_hf (no transformers needed); "seqmix" is loaded as saved; a config with `n_layer` is read as a
    Based-repo checkpoint (convert_based_repo)."""
    from seqmix.checkpoint import from_pretrained, resolve_model_dir

    src_dir = resolve_model_dir(src, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    cfg = _read_config(src_dir)
    model_type = cfg.get("model_type")
    if model_type == "seqmix":
        return from_pretrained(src_dir, registry=registry)
    if model_type in ("llama", "mamba"):
        from seqmix.convert_hf import convert_llama, convert_mamba_hf

        return (convert_llama if model_type == "llama" else convert_mamba_hf)(src_dir, registry=registry)
    if "n_layer" not in cfg:  # every Based-repo config states n_layer
        raise ConversionError(f"config.json (model_type {model_type!r}) is neither a Based-repo config (no "
                              f"n_layer) nor a transformers 'llama' or 'mamba' model; seqmix cannot import it")
    return convert_based_repo(src_dir, registry=registry)
