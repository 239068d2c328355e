"""Evaluation: the lm-eval model `seqmix` (seqmix.eval.lm_eval), the Based paper's recall tasks, `seqmix eval`.

Nothing here imports lm-eval until it is used: `import seqmix.eval` is cheap.
"""
from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"  # lm-eval task configs: based_swde, based_fda, based_squad_completion

# Which variant of a recall task ran, recorded beside every result.
TASK_VARIANTS = {
    **{f"based_{t}": "Based paper (prompt and gold as stored)" for t in ("swde", "fda", "squad_completion")},
    **{t: "lm-eval upstream v1 (prompt and gold stripped)" for t in ("swde", "fda", "squad_completion")},
}


def task_variant(task: str) -> str:
    """The variant label of a task name: the two recall variants by name, anything else is lm-eval's task."""
    return TASK_VARIANTS.get(task, "lm-eval")


def run_lm_eval_cli(argv: list[str]) -> None:
    """lm-eval's own command line with `argv` unchanged, after the `seqmix` model is registered."""
    import sys

    try:
        import seqmix.eval.lm_eval  # noqa: F401  (registers --model seqmix)
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise SystemExit(f"seqmix eval lm-eval needs lm-eval: pip install -e '.[eval]' ({e})") from None
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()
