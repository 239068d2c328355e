"""The `seqmix` command line: build (inspect/save a model from a spec), plugins, generate, convert (import checkpoints), eval, mqar."""
from __future__ import annotations

import json
import sys
import time
from typing import Optional

import click


_INT = click.IntRange(-(1 << 63), (1 << 63) - 1)  # integer options fit in int64 (torch's sizes), or click says so


def _fail(message: str) -> None:
    click.echo(message, err=True)
    sys.exit(2)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _human_flops(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="seqmix")
def main() -> None:
    """Hybrid sequence models from a short spec string, e.g. seqmix build "based,swa64,mlp" --layers 36."""


@main.command()
@click.argument("spec")
@click.option("--layers", type=_INT, default=None, help="Tile the spec to this many blocks.")
@click.option("--d-model", type=_INT, default=None, help="Model width (default 1024, or the named architecture's).")
@click.option("--heads", type=_INT, default=None, help="Default head count for mixers that take one.")
@click.option("--vocab", type=_INT, default=None, help="Vocabulary size before padding (default 50257, GPT-2).")
@click.option("--seq-len", type=_INT, default=None, help="Context length for state sizes and FLOPs (default 2048).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
@click.option("--save", "save_dir", type=click.Path(file_okay=False), default=None,
              help="Write an initialised model (config.json + model.safetensors) to this directory.")
@click.option("--overwrite", is_flag=True,
              help="Let --save replace the model files of an existing seqmix model directory (others are kept).")
@click.option("--forward", "forward_tokens", type=_INT, default=None, metavar="T",
              help="Also run one forward pass of the initialised model on T random tokens (CPU, fp32).")
def build(spec, layers, d_model, heads, vocab, seq_len, as_json, save_dir, overwrite, forward_tokens) -> None:
    """Show the block layout, parameters, state and FLOPs of SPEC (a spec string or a named architecture)."""
    from seqmix.config import resolve_model
    from seqmix.model import attention_kv_bytes, build_model, sequence_mixer_count
    from seqmix.registry import UnknownMixerError, load_registry
    from seqmix.spec import SpecError

    registry = load_registry()
    if forward_tokens is not None and forward_tokens <= 0:
        _fail(f"--forward needs a positive token count, got {forward_tokens}")
    try:
        config = resolve_model(spec, layers=layers, d_model=d_model, n_heads=heads, vocab_size=vocab,
                               max_seqlen=seq_len, registry=registry)
        model = build_model(config, device="meta", registry=registry)  # sizes first, nothing allocated
        if save_dir is not None:
            _check_target(save_dir, overwrite)  # refused before the model is built
        if save_dir is not None or forward_tokens is not None:
            _check_fits(model, forward_tokens, save_dir)
            model = build_model(config, device="cpu", registry=registry)
    except (SpecError, UnknownMixerError) as e:
        _fail(str(e))
    except (ValueError, RuntimeError) as e:  # an argument the mixer rejected at construction (heads not
        _fail(f"error: {e}")  # dividing d_model), or an implementation named explicitly that cannot run here

    from seqmix.spec import format_spec

    T = config.max_seqlen
    rows = model.block_rows(T)
    depth = sequence_mixer_count(model) or len(rows)
    report = {
        "spec": config.spec,
        "spec_compact": format_spec(model.layer_specs, registry, compact=True),
        "config": config.to_dict(),
        "blocks": rows,
        "totals": {
            "blocks": len(rows),
            "params": model.num_params(),
            "state_bytes": sum(r["state_bytes"] for r in rows),
            "flops_per_token": model.flops_per_token(T),
        },
        "attention_kv_cache_bytes": attention_kv_bytes(config, depth, T),
        "attention_depth": depth,
        "seq_len": T,
        "state_dtype": "bfloat16",
    }
    if forward_tokens is not None:
        report["forward"] = _forward_smoke(model, forward_tokens)
    if save_dir is not None:
        from seqmix.io import save

        try:
            report["saved"] = str(save(model, save_dir, overwrite=overwrite))
        except OSError as e:  # SaveRefusedError (a folder that changed meanwhile), SaveError (a full disk)
            _fail(f"error: {e}")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_build(report)


def _check_target(save_dir: str, overwrite: bool) -> None:
    """A one-screen error unless seqmix.io.save may write `save_dir` (new, empty, or a seqmix model directory
    with --overwrite)."""
    from seqmix.io.publish import SaveRefusedError, check_target, target_dir

    try:
        check_target(target_dir(save_dir), overwrite)
    except SaveRefusedError as e:
        _fail(f"error: {e}")


def _available_memory() -> Optional[int]:
    """Bytes of memory this machine can still give (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_fits(model, forward_tokens: Optional[int], save_dir: Optional[str]) -> None:
    """Refuse --forward / --save of a model (built on the meta device) that cannot fit, before allocating it."""
    import shutil
    from pathlib import Path

    cfg = model.config
    need = 4 * model.num_params()  # fp32 weights
    what = f"the model has {model.num_params():,} parameters ({_human_bytes(need)} in fp32)"
    if forward_tokens is not None:  # logits and their softmax, plus a few residual-stream copies per block
        need += 4 * forward_tokens * (3 * cfg.padded_vocab_size + 8 * cfg.d_model)
    have = _available_memory()
    if have is not None and need > have:
        flags = " and ".join(f for f, on in (("--forward", forward_tokens), ("--save", save_dir)) if on)
        _fail(f"error: {flags} would need about {_human_bytes(need)} of memory but {_human_bytes(have)} is "
              f"available: {what}. Use a smaller spec, --layers or --d-model, or drop {flags}: the table alone "
              "allocates nothing")
    if save_dir is not None:
        parent = Path(save_dir).resolve()
        while not parent.exists():
            parent = parent.parent
        free = shutil.disk_usage(parent).free
        if 4 * model.num_params() > free:
            _fail(f"error: --save {save_dir}: {what} but {parent} has {_human_bytes(free)} free")


def _forward_smoke(model, T: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (1, T + 1), generator=g)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            loss = model.loss(tokens[:, :-1], tokens[:, 1:]).item()
    except (RuntimeError, MemoryError) as e:  # out of memory, or a kernel that cannot run on CPU tensors
        _fail(f"error: the forward pass on {T} tokens failed: {e}")
    dt = time.perf_counter() - t0
    if loss != loss:
        _fail("forward pass produced NaN loss")
    import math

    return {"tokens": T, "loss": loss, "uniform_loss": math.log(model.config.vocab_size), "seconds": dt}


def _print_build(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cfg = r["config"]
    table = Table(title=f"{r['spec_compact']}  (d_model={cfg['d_model']}, heads={cfg['n_heads']}, "
                        f"vocab={cfg['vocab_size']}, seq_len={r['seq_len']})")
    for col, just in (("#", "right"), ("mixer", "left"), ("params", "right"),
                      (f"state/seq @{r['seq_len']}", "right"), ("FLOPs/token", "right")):
        table.add_column(col, justify=just)
    for b in r["blocks"]:
        table.add_row(str(b["index"]), b["mixer"], f"{b['params']:,}",
                      _human_bytes(b["state_bytes"]) if b["state_bytes"] else "-", _human_flops(b["flops_per_token"]))
    t = r["totals"]
    table.add_section()
    table.add_row("", f"total ({t['blocks']} blocks, embedding + head incl.)", f"{t['params']:,}",
                  _human_bytes(t["state_bytes"]), _human_flops(t["flops_per_token"]))
    console.print(table)
    console.print(f"parameters: {t['params']:,}")
    console.print(f"decode state per sequence at {r['seq_len']} tokens ({r['state_dtype']} activations): "
                  f"{_human_bytes(t['state_bytes'])}; an all-attention stack of the same width and depth "
                  f"({r['attention_depth']} layers) holds a KV cache of {_human_bytes(r['attention_kv_cache_bytes'])}")
    if "forward" in r:
        f = r["forward"]
        console.print(f"forward pass on {f['tokens']} random tokens: loss {f['loss']:.3f} "
                      f"(uniform {f['uniform_loss']:.3f}) in {f['seconds']:.2f} s")
    if "saved" in r:
        console.print(f"saved the initialised model to {r['saved']}")


@main.command(name="plugins")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def plugins_cmd(as_json: bool) -> None:
    """List every registered mixer (provider, version, spec args, state kind, runnable implementations) and the
    checkpoint formats the importers read."""
    import torch

    from seqmix.registry import load_registry

    reg = load_registry()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for name in reg.names():
        e = reg.mixers[name]
        impls = {d: e.cls.available_impls(d) for d in devices}
        rows.append({
            "name": name, "dist": e.dist, "version": e.version, "plugin": e.plugin,
            "args": [{"name": a.name, "type": a.type.__name__, "default": a.default, "positional": a.positional,
                      "choices": list(a.choices) if a.choices else None, "help": a.help} for a in e.cls.spec_args],
            "state_kind": e.cls.state_kind, "description": e.cls.description,
            "impls": {d: {k: ("ok" if v is None else v) for k, v in m.items()} for d, m in impls.items()},
        })
    problems = [{"plugin": p.plugin, "dist": p.dist, "error": p.message} for p in reg.problems]
    importers = [{"model_type": k, "plugin": e.plugin, "dist": e.dist} for k, e in sorted(reg.importers.items())]
    if as_json:
        click.echo(json.dumps({"mixers": rows, "importers": importers, "problems": problems}, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="seqmix mixers")
    for col in ("name", "provided by", "args (positional first)", "state", *[f"runs on {d}" for d in devices]):
        table.add_column(col)
    for r in rows:
        args = ", ".join(("" if a["positional"] else "*") + a["name"] for a in r["args"]) or "-"
        table.add_row(r["name"], f"{r['dist']} {r['version']}", args, r["state_kind"],
                      *[", ".join(k for k, v in r["impls"][d].items() if v == "ok") or "-" for d in devices])
    console = Console()
    console.print(table)
    console.print("* keyword-only argument (name=value)")
    console.print("checkpoint formats (seqmix convert / seqmix.io.load): "
                  + (", ".join(f"{i['model_type']} ({i['dist']})" for i in importers) or "none"), highlight=False)
    for p in problems:
        console.print(f"[red]plugin {p['plugin']} ({p['dist']}):[/red] {p['error']}", highlight=False)


main.add_command(plugins_cmd, name="mixers")

from seqmix.eval.cli import eval_cmd  # noqa: E402  (click only; lm-eval is imported when the command runs)

main.add_command(eval_cmd)


@main.command(name="generate")
@click.argument("model")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=_INT, default=64, show_default=True, help="Tokens to generate at most.")
@click.option("--temperature", type=float, default=0.8, show_default=True, help="Softmax temperature; 0 = greedy.")
@click.option("--top-k", type=_INT, default=0, show_default=True, help="Sample among the k most likely tokens; 0 = all.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus mass in (0, 1]; 1 = off.")
@click.option("--seed", type=_INT, default=0, show_default=True, help="Seeds sampling (and a spec's random weights).")
@click.option("--tokenizer", "tokenizer_name", default=None,
              help="gpt2 or bytes; default: the one a model directory records, else gpt2.")
@click.option("--layers", type=_INT, default=None, help="With a spec: tile it to this many blocks.")
@click.option("--d-model", type=_INT, default=None, help="With a spec: model width.")
@click.option("--heads", type=_INT, default=None, help="With a spec: default head count.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Weights and activations (default: bfloat16 on CUDA, float32 on CPU).")
def generate_cmd(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, tokenizer_name, layers, d_model,
                 heads, device, dtype) -> None:
    """Continue PROMPT with MODEL (a model directory, a Hugging Face hub name such as hazyresearch/based-360m,
    or a spec / named architecture with random weights, for smoke tests and timing), streaming the text."""
    from pathlib import Path

    import torch

    from seqmix.registry import UnknownMixerError
    from seqmix.spec import SpecError

    device = _check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    try:
        from seqmix.tokenizer import get_tokenizer, recorded_tokenizer

        is_dir = Path(model).is_dir()
        if not is_dir and "/" in model:  # a hub name "org/name" (specs never hold a slash): fetch it first
            from seqmix.io import resolve_model_dir

            model, is_dir = str(resolve_model_dir(model)), True
        tok = get_tokenizer(tokenizer_name or (recorded_tokenizer(model) if is_dir else None) or "gpt2")
        if is_dir:
            from seqmix.io import load

            lm = load(model, device=device, dtype=dtype)
        else:
            from seqmix.config import resolve_model
            from seqmix.model import build_model

            config = resolve_model(model, layers=layers, d_model=d_model, n_heads=heads,
                                   vocab_size=tok.vocab_size)
            torch.manual_seed(seed)
            lm = build_model(config, device=device, dtype=dtype)
        if lm.config.vocab_size != tok.vocab_size:
            raise ValueError(f"the model's vocabulary has {lm.config.vocab_size} tokens but the tokenizer has "
                             f"{tok.vocab_size}; pass the model's tokenizer with --tokenizer")
        ids = tok.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty: give some text to continue")
        generated: list[int] = []
        shown = [""]

        def stream(i: int, tokens_B) -> None:
            if i == 0:
                click.echo(prompt, nl=False)  # only now: a bad argument fails before anything is printed
            t = int(tokens_B[0])
            if t == tok.eos_id:
                return
            generated.append(t)
            text = tok.decode(generated)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                click.echo(text[len(shown[0]):] if text.startswith(shown[0]) else text, nl=False)
                shown[0] = text

        t0 = time.perf_counter()
        out = lm.generate([ids], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, eos_token_id=tok.eos_id, seed=seed, callback=stream)
        dt = time.perf_counter() - t0
        click.echo((prompt if out.shape[1] == 0 else "") + tok.decode(generated)[len(shown[0]):], nl=False)
    except (SpecError, UnknownMixerError) as e:
        _fail(str(e))
    except (ValueError, OSError, ImportError, RuntimeError) as e:  # RuntimeError: NaN logits, or an explicitly
        click.echo("", err=True)  # named kernel that cannot run on this device
        _fail(f"error: {e}")
    click.echo("")
    n = out.shape[1]
    click.echo(f"[{n} tokens in {dt:.2f} s, {n / max(dt, 1e-9):.1f} tokens/s, prefill included]", err=True)


def _check_device(device: str) -> str:
    """`device` if torch can run on it here, else a one-screen error saying what is missing."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        _fail(f"error: --device {device!r} is not a device name: use cpu or cuda (cuda:N for GPU N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None else
                   "torch sees no CUDA GPU (check CUDA_VISIBLE_DEVICES and the driver)")
            _fail(f"error: --device {device}: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            _fail(f"error: --device {device}: there are {torch.cuda.device_count()} CUDA devices "
                  f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif dev.type != "cpu":
        _fail(f"error: --device {device}: seqmix generate runs on cpu or cuda")
    return device


@main.command(name="convert")
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--revision", default=None, help="Branch, tag or commit, when SRC is a hub name.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Hugging Face cache to download into / read from (default: huggingface_hub's).")
@click.option("--local-files-only", is_flag=True, help="Never download: use the Hugging Face cache only.")
@click.option("--overwrite", is_flag=True,
              help="Replace the model files of DST when it is a seqmix model directory (others are kept).")
def convert_cmd(src, dst, revision, cache_dir, local_files_only, overwrite) -> None:
    """Import the checkpoint SRC (a directory or a Hugging Face hub name such as hazyresearch/based-360m) and
    write a seqmix model directory DST. SRC is a Based-repo checkpoint (config.json + pytorch_model.bin: the
    Based hybrids, their attention baselines and Mamba stacks) or a transformers save_pretrained directory of
    LlamaForCausalLM or MambaForCausalLM (read from config.json); single or sharded weights. DST must be new,
    empty, or (with --overwrite) a seqmix model directory; it is never SRC or a folder holding SRC."""
    from seqmix.io import load, resolve_model_dir, save
    from seqmix.io.publish import refuse_source

    try:
        src_dir = resolve_model_dir(src, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        refuse_source(src_dir, dst)
        _check_target(dst, overwrite)  # before the (possibly long) import
        model = load(src_dir)
        out = save(model, dst, overwrite=overwrite)
    except (ValueError, OSError, KeyError, ImportError) as e:  # CheckpointError, SaveError, SaveRefusedError
        _fail(f"error: {e}")
    click.echo(f"wrote {out}: {model.config.spec} ({model.num_params():,} parameters)")


from seqmix.synthetics.cli import mqar  # noqa: E402  (the `seqmix mqar` group; its code lives in seqmix/synthetics)

main.add_command(mqar)
