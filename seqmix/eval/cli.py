"""The `seqmix eval` command: models x tasks (in this process, or -p one process per GPU) and `seqmix eval lm-eval`."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

DTYPE_CHOICES = ["bfloat16", "float16", "float32"]


def _fail(message: str) -> None:
    click.echo(message, err=True)
    sys.exit(2)


def _batch_size(value: str):
    if value.isdigit() and int(value) > 0:
        return int(value)
    if value == "auto" or (value.startswith("auto:") and value[5:].replace(".", "", 1).isdigit()):
        return value
    _fail(f"--batch-size must be a positive integer, 'auto' or 'auto:N', got {value!r}")


@click.group(name="eval", invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-m", "--model", "models", multiple=True, metavar="MODEL",
              help="A model directory or hub name (repeat for several).")
@click.option("-t", "--task", "tasks", multiple=True, metavar="TASK",
              help="An lm-eval task or group name, based_swde / based_fda / based_squad_completion, or a task YAML "
                   "file (repeat for several).")
@click.option("--limit", type=float, default=None, help="Examples per task (a fraction of them when < 1).")
@click.option("--batch-size", default="1", show_default=True, help="Requests per forward: N, auto or auto:N.")
@click.option("-p", "--parallel", is_flag=True, help="One worker process per visible GPU, configs spread over them.")
@click.option("--output-dir", type=click.Path(file_okay=False), default="eval_results", show_default=True,
              help="Where results.json, results.md (and --log-samples' files, under lm-eval/) go.")
@click.option("--log-samples", is_flag=True, help="Also write lm-eval's per-(model, task) results and samples.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="bfloat16", show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--include-path", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Another directory of lm-eval task YAML files.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json's content instead of the table.")
@click.pass_context
def eval_cmd(ctx, models, tasks, limit, batch_size, parallel, output_dir, log_samples, dtype, device, include_path,
             as_json) -> None:
    """Evaluate every MODEL on every TASK with lm-eval (seqmix's adapter, greedy, zero-shot unless the task
    says otherwise) and print a models x metrics table; results.json and results.md record lm-eval's version,
    the seqmix commit, dtype, batch size and which variant of each task ran.

    `seqmix eval lm-eval ARGS` runs lm-eval's own command line with ARGS unchanged and `--model seqmix`
    available (add `--include_path` with seqmix's task directory, `seqmix eval tasks-dir`, for based_*)."""
    if ctx.invoked_subcommand is not None:
        if models or tasks:
            _fail("-m/-t belong to `seqmix eval`; `seqmix eval lm-eval` takes lm-eval's own arguments")
        return
    if not models or not tasks:
        _fail("give at least one -m MODEL and one -t TASK, e.g. seqmix eval -m runs/tiny/model -t based_swde "
              "(or lm-eval's own command line: seqmix eval lm-eval --model seqmix ...)")
    for m in models:
        if not Path(m).is_dir() and (Path(m).exists() or m.count("/") != 1):
            _fail(f"no model directory {m!r}: pass a seqmix / Based-repo / transformers model directory or a "
                  f"Hugging Face hub name org/name")
    if limit is not None and limit <= 0:
        _fail(f"--limit must be positive, got {limit}")
    from seqmix.eval.runner import EvalSettings

    settings = EvalSettings(models=list(models), tasks=list(tasks), output_dir=output_dir,
                            limit=None if limit is None else int(limit) if limit >= 1 else limit,
                            batch_size=_batch_size(batch_size), dtype=dtype, device=device, log_samples=log_samples,
                            include_path=[str(Path(p).resolve()) for p in include_path])
    record = _run(settings, parallel)
    from seqmix.eval.runner import write_record

    json_path, md_path = write_record(output_dir, record)
    if as_json:
        click.echo(json.dumps(record, indent=2, default=str))
    else:
        _print_table(record)
        click.echo(f"wrote {json_path} and {md_path}")
    if record["errors"]:
        sys.exit(1)


@eval_cmd.command(name="lm-eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                                    "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lm_eval_cmd(args) -> None:
    """lm-eval's command line (ARGS unchanged) with the `seqmix` model registered."""
    from seqmix.eval import run_lm_eval_cli

    run_lm_eval_cli(list(args))


@eval_cmd.command(name="tasks-dir")
def tasks_dir_cmd() -> None:
    """Print the directory of seqmix's task configs (lm-eval's --include_path for based_*)."""
    from seqmix.eval import TASKS_DIR

    click.echo(str(TASKS_DIR))


def _run(settings, parallel: bool) -> dict:
    """Run every config under a rich progress bar over configs and the running configs' requests. What lm-eval
    prints meanwhile (its logging, tqdm bars) goes to output_dir/seqmix-eval.log instead of the terminal."""
    import contextlib
    import logging

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from seqmix.eval.runner import Evaluator

    try:  # checked before anything runs (and before stderr goes to the log)
        evaluator = Evaluator(settings)
        evaluator.check_tasks()
    except (ValueError, OSError) as e:
        _fail(f"error: {e}")
    gpus = []
    if parallel:
        from seqmix.eval.parallel import visible_gpus

        gpus = visible_gpus()
        if not gpus:
            _fail("-p runs one worker per GPU, and no GPU is visible; drop -p to run in this process")
    configs = settings.configs()
    rows: dict[int, list[dict]] = {}
    errors: list[dict] = []
    t0 = time.perf_counter()
    console = Console(file=sys.stderr)
    Path(settings.output_dir).mkdir(parents=True, exist_ok=True)
    log_path = Path(settings.output_dir) / "seqmix-eval.log"
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with open(log_path, "a") as log, contextlib.redirect_stderr(log), \
            Progress(*columns, console=console, transient=False) as bar:
        handler = logging.StreamHandler(log)
        logging.getLogger("lm_eval").addHandler(handler)
        overall = bar.add_task(f"{len(configs)} configs", total=len(configs))
        running: dict[int, int] = {}

        def on_progress(index: int, done: int, total: int) -> None:
            if index not in running:
                m, t = configs[index]
                running[index] = bar.add_task(f"  {m} x {t}", total=None)
            bar.update(running[index], completed=done, total=total or None)

        def finished(index: int, new_rows=None, message=None) -> None:
            if index in running:
                bar.remove_task(running.pop(index))
            m, t = configs[index]
            if message is not None:
                errors.append({"model": m, "task": t, "message": message})
                console.print(f"[red]{m} x {t} failed:[/red] {message}")
            rows[index] = new_rows or []
            bar.advance(overall)

        try:
            if parallel:
                workers = _parallel(settings, gpus, on_progress, finished)
            else:
                workers = 1
                _in_process(evaluator, configs, on_progress, finished)
        finally:
            logging.getLogger("lm_eval").removeHandler(handler)
    from seqmix.eval.runner import build_record

    ordered = [r for i in sorted(rows) for r in rows[i]]  # config order, whatever order workers finished in
    return build_record(settings, ordered, errors, time.perf_counter() - t0, workers)


def _in_process(evaluator, configs, on_progress, finished) -> None:
    for i, (model, task) in enumerate(configs):
        on_progress(i, 0, 0)
        try:
            finished(i, evaluator.run(i, model, task, on_progress))
        except Exception as e:  # one failing config (a missing dataset, a bad checkpoint) must not stop the rest
            finished(i, message=f"{type(e).__name__}: {e}")


def _parallel(settings, gpus, on_progress, finished) -> int:
    from seqmix.eval.parallel import run_parallel

    def on_event(ev: dict) -> None:
        if ev["event"] == "progress":
            on_progress(ev["index"], ev["done"], ev["total"])
        elif ev["event"] == "result":
            finished(ev["index"], ev["rows"])
        elif ev["event"] == "error":
            finished(ev["index"], message=ev["message"])

    run_parallel(settings, gpus, on_event)
    return min(len(gpus), len(settings.configs()))


def _print_table(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = record["table"]
    table = Table(title=f"lm-eval {record['lm_eval_version']}, seqmix {record['seqmix_commit'][:12]}, "
                        f"{record['dtype']}, batch {record['batch_size']}, limit {record['limit']}")
    table.add_column("model")
    for c in t["columns"]:
        table.add_column(c, justify="right")
    for model, cells in t["rows"].items():
        table.add_row(model, *["-" if cells.get(c) is None else f"{cells[c]:.4f}" for c in t["columns"]])
    console = Console()
    console.print(table)
    seen = {}
    for r in record["results"]:
        seen.setdefault(r["task"], r["variant"])
    for task, variant in seen.items():
        console.print(f"  {task}: {variant}")
