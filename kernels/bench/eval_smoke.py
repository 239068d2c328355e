"""`seqmix eval` on a GPU with no hub: the recall tasks on generated local rows, and two lm-eval task configs on a
local stand-in dataset; prints both tables (results.md) with the date, device and command.

    python kernels/bench/eval_smoke.py --model runs/based --model runs/attn --model runs/mamba \
        --standard-model runs/based --out /tmp/eval_smoke -p

Recall tasks: seqmix's based_swde, based_fda and based_squad_completion configs (prompt, until "\\n", 48 tokens,
contains) with their dataset replaced by --rows generated documents each: "key: value" records of random words
(the fda ones longer than 2,000 tokens, so left truncation applies), the prompt ending in one record's key.
Standard tasks: lm-eval's own wikitext (loglikelihood_rolling) and lambada_openai (loglikelihood) configs with
their dataset replaced by held-out paragraphs of the embedded Shakespeare corpus, renamed *_on_shakespeare so the
table cannot be mistaken for the real benchmarks (their datasets need the hub).
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import subprocess
import sys
from pathlib import Path

from seqmix.eval import TASKS_DIR

WORDS = ("amber basil cedar delta ember fable garnet harbor indigo juniper kelp lumen maple nectar onyx pepper quartz "
         "raven saffron tundra umber velvet willow xenon yarrow zephyr").split()


def recall_rows(n: int, seed: int, fields: int) -> list[dict]:
    """Documents of `fields` "key: value" lines; the prompt asks for one key, the gold is its value."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        keys = rng.sample([f"field{i}" for i in range(10 * fields)], fields)
        values = [" ".join(rng.choice(WORDS) for _ in range(2)) for _ in keys]
        q = rng.randrange(fields)
        doc = "".join(f"{k}: {v}\n" for k, v in zip(keys, values))
        rows.append({"text": f"{doc}\n{keys[q]}:", "value": f" {values[q]}"})
    return rows


def shakespeare_rows() -> list[dict]:
    """Paragraphs from the end of the embedded plays (the tiny recipe's held-out tail), at least 20 words each."""
    corpus = Path(__file__).resolve().parents[2] / "seqmix" / "data" / "corpus"
    rows = []
    for play in sorted(corpus.glob("*.txt")):
        paras = [" ".join(p.split()) for p in play.read_text().split("\n\n")]
        rows += [{"text": p, "page": p} for p in paras[-60:] if len(p.split()) >= 20]
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task_yaml(path: Path, include: Path, data: Path, split: str, name: str = None, extra=()) -> Path:
    lines = [f"include: {include}", *([f"task: {name}"] if name else []), *extra, "dataset_path: json",
             "dataset_name: null",
             "dataset_kwargs:", "  data_files:", f"    {split}: {data}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="Model directories for the recall tasks.")
    ap.add_argument("--standard-model", action="append", default=[], help="Model(s) for the two lm-eval configs.")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--batch-size", default="32")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("-p", action="store_true", help="Pass -p to seqmix eval (one worker per GPU).")
    args = ap.parse_args()
    d = args.out / "tasks"
    d.mkdir(parents=True, exist_ok=True)
    recall = []
    for i, (task, fields) in enumerate((("swde", 12), ("fda", 150), ("squad_completion", 30))):
        data = write_jsonl(d / f"{task}.jsonl", recall_rows(args.rows, seed=i, fields=fields))
        recall.append(task_yaml(d / f"local_based_{task}.yaml", TASKS_DIR / f"based_{task}.yaml", data, "validation"))
    import lm_eval

    upstream = Path(lm_eval.__file__).parent / "tasks"
    data = write_jsonl(d / "shakespeare.jsonl", shakespeare_rows())
    standard = [task_yaml(d / "wikitext.yaml", upstream / "wikitext" / "wikitext.yaml", data, "test",
                          "wikitext_on_shakespeare", ["training_split: null", "validation_split: null"]),
                task_yaml(d / "lambada.yaml", upstream / "lambada" / "lambada_openai.yaml", data, "test",
                          "lambada_openai_on_shakespeare")]
    runs = [("recall", args.model, recall, ["-p"] if args.p else []), ("standard", args.standard_model, standard, [])]
    worst = 0
    for label, models, tasks, extra in runs:
        if not models:
            continue
        cmd = [sys.executable, "-c", "from seqmix.cli import main; main()", "eval",
               *[a for m in models for a in ("-m", m)], *[a for t in tasks for a in ("-t", str(t))], "--batch-size", args.batch_size, "--dtype", args.dtype, "--output-dir", str(args.out / label), *extra]
        print(f"## {label}: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, {_device()}")
        print("$ seqmix " + " ".join(cmd[3:]), flush=True)
        proc = subprocess.run(cmd)
        print((args.out / label / "results.md").read_text() if (args.out / label / "results.md").exists()
              else f"(no results.md; exit {proc.returncode})", flush=True)
        worst = max(worst, proc.returncode)
    sys.exit(worst)  # a failed config is in its table; the other run still ran


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


if __name__ == "__main__":
    main()
