"""`seqmix mqar`: MQAR sweeps (spec x d_model x lr) with rich progress, `--preset figure2`, and `seqmix mqar plot DIR`."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import click

# The Based paper's Figure 2 grid (zoology's arxiv24_based_figure2 configs), 2 blocks, no MLP, 1 head everywhere as
# there; attention and sliding windows without rotary embeddings, as zoology's (the conv gives position).
FIGURE2_POINTS = (
    [(f"conv,based:feature_dim={f}", d) for d in (48, 64, 128) for f in (8, 16, 24)]
    + [(f"conv,swa:{w}:rotary_dim=0", 128) for w in (16, 32, 64, 128, 256, 512)]
    + [("conv,attn:rotary_dim=0", d) for d in (64, 128)]
)
MAMBA_POINTS = [(f"mamba:{n}*2", d) for d in (64, 128) for n in (8, 16)]
PRESETS = {
    "figure2": dict(points=FIGURE2_POINTS, lrs=(3.16e-3, 1e-2), epochs=8),
    "figure2-mamba": dict(points=MAMBA_POINTS, lrs=(3.16e-3, 1e-2), epochs=8),
}


def _fail(message: str) -> None:
    click.echo(message, err=True)
    sys.exit(2)


@click.group(name="mqar", invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--spec", "specs", multiple=True, help="A model spec (repeatable), e.g. \"conv,based:feature_dim=16\".")
@click.option("--d-model", "widths", type=int, multiple=True, help="Model width (repeatable).")
@click.option("--lr", "lrs", type=float, multiple=True, help="Learning rate (repeatable); the best one per point is kept.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="A named grid: figure2 = the Based paper's Figure 2 points (see README); flags given override it.")
@click.option("--epochs", type=int, default=None, help="Epochs per run at most (default 8).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--heads", type=int, default=1, show_default=True, help="The model's default head count.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the data and the weights.")
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="bf16 = autocast on CUDA (CPU runs fp32 either way).")
@click.option("--out", type=click.Path(file_okay=False), default="runs/mqar", show_default=True,
              help="Directory of results.jsonl, mqar.png and mqar.md.")
@click.option("--workers", type=int, default=None,
              help="Runs trained at once, each in its own process (default: 1 on CPU, 8 per GPU).")
@click.option("--max-minutes", type=float, default=None,
              help="Start no run after this many minutes; run the command again to continue.")
@click.option("--scale", type=float, default=1.0, show_default=True,
              help="Multiply every segment's example count (smoke tests: 0.001).")
@click.option("--steps-per-epoch", type=int, default=None, help="Cap optimizer steps per epoch (smoke tests).")
@click.option("--json", "as_json", is_flag=True, help="Print the best run per point as JSON.")
@click.pass_context
def mqar(ctx, specs, widths, lrs, preset, epochs, batch_size, heads, seed, precision, out, workers, max_minutes,
         scale, steps_per_epoch, as_json) -> None:
    """Train every (spec x d_model x lr) on multi-query associative recall and plot accuracy against state size.

    Runs already in OUT/results.jsonl are skipped, so an interrupted sweep continues where it stopped."""
    if ctx.invoked_subcommand is not None:
        return
    from seqmix.registry import UnknownMixerError
    from seqmix.synthetics.sweep import default_devices, load_results, plan, python_command

    p = PRESETS.get(preset, {})
    points = list(p.get("points", []))
    if specs or widths:
        if not specs or not widths:
            _fail("give both --spec and --d-model (each repeatable), or --preset figure2")
        points = [(s, d) for s in specs for d in widths]
    lrs = list(lrs) or list(p.get("lrs", ()))
    if not points or not lrs:
        _fail("nothing to run: give --spec, --d-model and --lr (each repeatable), or --preset figure2\n"
              "  e.g. seqmix mqar --spec \"conv,based:feature_dim=16\" --d-model 64 --lr 3e-3")
    epochs = p.get("epochs", 8) if epochs is None else epochs
    for name, v in (("--epochs", epochs), ("--batch-size", batch_size), ("--heads", heads),
                    ("--steps-per-epoch", steps_per_epoch), ("--workers", workers)):
        if v is not None and v <= 0:
            _fail(f"{name} must be positive, got {v}")
    if not scale > 0:
        _fail(f"--scale must be positive, got {scale}")
    if any(not lr > 0 for lr in lrs):
        _fail(f"--lr must be positive, got {lrs}")
    try:
        the_plan = plan(points, lrs, _data(scale, seed), heads=heads, epochs=epochs, batch_size=batch_size,
                        seed=seed, precision=precision, steps_per_epoch=steps_per_epoch)
        load_results(Path(out))
    except UnknownMixerError as e:
        _fail(str(e))
    except (ValueError, OSError) as e:  # SpecError / ArgError are ValueErrors: a bad spec, size or results file
        _fail(f"error: {e}")
    devices = default_devices()
    if workers is None:
        workers = 8 * len(devices) if devices[0].startswith("cuda") else 1
    counts = _run_with_progress(the_plan, Path(out), devices, workers, max_minutes, python_command())
    _finish(Path(out), counts, as_json)


def _data(scale: float, seed: int):
    import dataclasses

    from seqmix.synthetics.train import DataConfig

    d = DataConfig(seed=seed)
    if scale == 1.0:
        return d
    resize = lambda segs: tuple(dataclasses.replace(s, examples=max(1, math.ceil(s.examples * scale))) for s in segs)
    return DataConfig(train=resize(d.train), test=resize(d.test), seed=seed)


def _label(run) -> str:
    return f"{run.spec} d={run.d_model} lr={run.lr:g}"


def _run_with_progress(the_plan, out: Path, devices, workers: int, max_minutes, command: str) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from seqmix.synthetics.sweep import Reporter, execute

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        total = progress.add_task("runs", total=len(the_plan.runs))
        slots: dict[int, int] = {}

        def start(slot, idx, run):
            if slot not in slots:
                slots[slot] = progress.add_task("", total=run.epochs)
            progress.update(slots[slot], description=f"  [{slot}] {_label(run)}", completed=0, total=run.epochs)

        def epoch(slot, idx, e, acc, loss):
            run = the_plan.runs[idx]
            progress.update(slots[slot], completed=e,
                            description=f"  [{slot}] {_label(run)} acc {acc:.3f} loss {loss:.3f}")

        def done(idx, rec):
            progress.advance(total)
            progress.console.print(f"[green]done[/green] {_label(the_plan.runs[idx])}: accuracy "
                                   f"{rec['accuracy']:.3f} after {rec['epochs_run']} epochs, {rec['seconds']:.0f} s")

        def error(idx, message):
            progress.advance(total)
            progress.console.print(f"[red]failed[/red] {_label(the_plan.runs[idx])} (nothing recorded):\n{message}")

        from seqmix.synthetics.sweep import load_results, record_key

        have = {record_key(r) for r in load_results(out)}
        progress.advance(total, sum(the_plan.key(r) in have for r in the_plan.runs))
        try:
            return execute(the_plan, out, devices=devices, workers=workers, max_minutes=max_minutes,
                           reporter=Reporter(start, epoch, done, error), command=command)
        except RuntimeError as e:
            _fail(f"error: {e}")


def _finish(out: Path, counts: dict, as_json: bool) -> None:
    import json

    from seqmix.synthetics.plot import best_per_point
    from seqmix.synthetics.sweep import load_results

    records = load_results(out)
    msg = (f"{counts['done']} runs trained, {counts['skipped']} already in {out / 'results.jsonl'}, "
           f"{counts['failed']} failed, {counts['left']} left for the next invocation")
    click.echo(msg, err=True)
    if records:
        _write_outputs(out, records)
    if as_json:
        click.echo(json.dumps(best_per_point(records), indent=2))
    if counts["failed"]:
        sys.exit(1)


def _write_outputs(out: Path, records) -> None:
    from seqmix.synthetics.plot import write_outputs

    try:
        md, png = write_outputs(out, records)
    except ImportError as e:
        _fail(f"error: {e}")
    click.echo(f"wrote {md} and {png}", err=True)


@mqar.command(name="plot")
@click.argument("directory", type=click.Path(file_okay=False))
def plot_cmd(directory) -> None:
    """Redraw DIRECTORY/mqar.png and mqar.md from DIRECTORY/results.jsonl alone."""
    from seqmix.synthetics.sweep import load_results

    out = Path(directory)
    try:
        records = load_results(out)
    except ValueError as e:
        _fail(f"error: {e}")
    if not records:
        _fail(f"error: no results in {out / 'results.jsonl'}; run `seqmix mqar ... --out {out}` first")
    _write_outputs(out, records)
