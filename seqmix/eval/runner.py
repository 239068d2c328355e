"""`seqmix eval`: every model x every task through lm_eval.simple_evaluate, then one table and results.json/.md.

A config is one (model, task) pair. In one process the task index is built once, each task (and its dataset)
is loaded once and reused for every model, and each model is loaded once for all its tasks. With -p the configs
are handed out to one worker process per visible GPU (seqmix.eval.parallel), which do the same.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from seqmix.eval import TASKS_DIR, task_variant

# (config index, requests done, requests in all) while a config runs
RequestProgress = Callable[[int, int, int], None]


@dataclass
class EvalSettings:
    """What every config of one `seqmix eval` run shares."""

    models: list[str]
    tasks: list[str]
    output_dir: str = "eval_results"
    limit: Optional[float] = None  # examples per task (a fraction when < 1), for smoke runs
    batch_size: Union[int, str] = 1
    dtype: str = "bfloat16"
    device: Optional[str] = None  # default: cuda when available
    log_samples: bool = False
    include_path: list[str] = field(default_factory=list)
    bootstrap_iters: int = 1000

    def configs(self) -> list[tuple[str, str]]:
        """The (model, task) pairs, model-major, so a model stays loaded across its tasks."""
        return [(m, t) for m in self.models for t in self.tasks]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Evaluator:
    """Runs configs in this process; caches the task manager, loaded tasks and the current model."""

    def __init__(self, settings: EvalSettings):
        from lm_eval.tasks import TaskManager

        self.settings = settings
        ours = {p.stem for p in TASKS_DIR.glob("*.yaml")}
        # lm-eval's own index (thousands of YAML files, seconds to build) only when a task may come from it
        defaults = any(t not in ours and not t.endswith(".yaml") for t in settings.tasks)
        self.task_manager = TaskManager(include_path=[str(TASKS_DIR), *settings.include_path],
                                        include_defaults=defaults)
        self._tasks: dict[str, dict] = {}
        self._model_name: Optional[str] = None
        self._lm = None

    def check_tasks(self) -> None:
        """Every task name is known (or a YAML file): a clear error before any model is loaded."""
        unknown = [t for t in self.settings.tasks
                   if not (Path(t).is_file() if t.endswith(".yaml") else self.task_manager.match_tasks([t]))]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}: give lm-eval task names (`lm-eval ls tasks`), "
                             f"seqmix's based_swde / based_fda / based_squad_completion, or a task YAML file")

    def tasks(self, spec: str) -> dict:
        """The leaf tasks of `spec` (a task, group or YAML file), loaded once: {name: Task}."""
        if spec not in self._tasks:
            self._tasks[spec] = self.task_manager.load([spec])["tasks"]
        return self._tasks[spec]

    def model(self, name: str):
        if self._model_name != name:
            self._lm = None  # free the previous model before loading the next
            _free_cuda()
            from seqmix.eval.lm_eval import SeqmixLM

            s = self.settings
            self._lm = SeqmixLM(name, dtype=s.dtype, device=s.device, batch_size=s.batch_size)
            self._model_name = name
        return self._lm

    def run(self, index: int, model: str, spec: str, progress: Optional[RequestProgress] = None) -> list[dict]:
        """Evaluate one config; returns one row per leaf task (see `rows_from_results`)."""
        import lm_eval

        s = self.settings
        lm = self.model(model)
        lm.progress = None if progress is None else (lambda done, total: progress(index, done, total))
        tracker = None
        if s.log_samples:
            from lm_eval.loggers import EvaluationTracker

            tracker = EvaluationTracker(output_path=str(Path(s.output_dir) / "lm-eval"))
        tasks = self.tasks(spec)
        out = lm_eval.simple_evaluate(model=lm, model_args=f"pretrained={model}", tasks=list(tasks.values()),
                                      task_manager=self.task_manager, limit=s.limit, log_samples=s.log_samples,
                                      bootstrap_iters=s.bootstrap_iters, evaluation_tracker=tracker)
        if tracker is not None:
            samples = out.pop("samples")
            tracker.save_results_aggregated(results=out, samples=samples)
            for task_name in out["configs"]:
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
        return rows_from_results(model, out)


def rows_from_results(model: str, out: dict) -> list[dict]:
    """lm-eval's results dict -> one row per task: model, task, variant, version, examples, metrics."""
    rows = []
    for task, res in out["results"].items():
        metrics = {}
        for key, value in res.items():
            if "," not in key or "_stderr" in key:
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric} ({filt})"
            stderr = res.get(f"{metric}_stderr,{filt}")
            metrics[name] = {"value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None}
        rows.append({"model": model, "task": task, "variant": task_variant(task),
                     "task_version": out.get("versions", {}).get(task), "examples": out["n-samples"].get(task,
                     {}).get("effective"), "metrics": metrics})
    return rows


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the record ------------------------------------------------------------------------------------
def seqmix_commit() -> str:
    """The git commit of the seqmix source that ran ("+dirty" with uncommitted changes), or "unknown"."""
    src = Path(__file__).resolve().parents[2]
    try:
        top = subprocess.run(["git", "-C", str(src), "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != src:  # not a checkout of seqmix itself
            return "unknown"
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_record(settings: EvalSettings, rows: list[dict], errors: list[dict], seconds: float,
                 workers: int) -> dict:
    """Everything results.json holds: versions, settings, one row per (model, task), errors, the table."""
    from importlib.metadata import version

    import seqmix

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "lm_eval_version": version("lm_eval"),
        "seqmix_version": seqmix.__version__,
        "seqmix_commit": seqmix_commit(),
        "dtype": settings.dtype,
        "batch_size": settings.batch_size,
        "limit": settings.limit,
        "device": settings.device or ("cuda" if _cuda() else "cpu"),
        "workers": workers,
        "seconds": round(seconds, 1),
        "settings": settings.to_dict(),
        "results": rows,
        "errors": errors,
        "table": table(settings, rows),
    }


def table(settings: EvalSettings, rows: list[dict]) -> dict:
    """{"columns": ["task/metric", ...], "rows": {model: {column: value}}} in the order models and tasks were given."""
    columns: list[str] = []
    cells: dict[str, dict[str, float]] = {m: {} for m in settings.models}
    for r in rows:
        for metric, v in r["metrics"].items():
            col = f"{r['task']}/{metric}"
            if col not in columns:
                columns.append(col)
            cells.setdefault(r["model"], {})[col] = v["value"]
    return {"columns": columns, "rows": cells}


def markdown(record: dict) -> str:
    """results.md: a header naming versions and settings, the models x metrics table, the task variants."""
    t = record["table"]
    lines = [f"# seqmix eval, {record['date']}", "",
             f"lm-eval {record['lm_eval_version']}, seqmix {record['seqmix_version']} (commit "
             f"{record['seqmix_commit']}), dtype {record['dtype']}, batch size {record['batch_size']}, "
             f"limit {record['limit']}, device {record['device']}, {record['workers']} worker(s), "
             f"{record['seconds']} s", "",
             "| model | " + " | ".join(t["columns"]) + " |", "|---|" + "---:|" * len(t["columns"])]
    for model, cells in t["rows"].items():
        lines.append(f"| {model} | " + " | ".join(_fmt(cells.get(c)) for c in t["columns"]) + " |")
    variants = {r["task"]: (r["variant"], r["task_version"], r["examples"]) for r in record["results"]}
    lines += ["", "| task | variant | version | examples |", "|---|---|---|---:|"]
    lines += [f"| {k} | {v} | {ver} | {n} |" for k, (v, ver, n) in variants.items()]
    if record["errors"]:
        lines += ["", "Errors:", *[f"- {e['model']} x {e['task']}: {e['message']}" for e in record["errors"]]]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def write_record(output_dir: Union[str, Path], record: dict) -> tuple[Path, Path]:
    """results.json and results.md under output_dir, each written to a temporary file and renamed into place."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in (("results.json", json.dumps(record, indent=2, default=str) + "\n"),
                       ("results.md", markdown(record))):
        tmp = out / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text)
        tmp.replace(out / name)
        paths.append(out / name)
    return paths[0], paths[1]
