"""`seqmix eval` end to end on the CPU: the tiny recipe's model and a converted transformers Llama x two fixture
tasks, in this process and over two worker processes; the table, results.json/.md and lm-eval's sample files."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lm_eval  # noqa: F401  (make install-test installs it)
import deepspeed  # noqa: F401  (make install-test installs it)

from click.testing import CliRunner  # noqa: E402

from evalkit import RECALL, based_task_yaml  # noqa: E402
from seqmix.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tiny-recipe model dir, converted Llama dir, [two fixture task YAMLs])."""
    import torch
    import transformers

    d = tmp_path_factory.mktemp("eval")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--recipe", "tiny", "train.steps=2",
           "data.seq_len=64", "optim.warmup_steps=1", "train.eval_every=2", "train.eval_batches=1",
           "train.save_every=2", "log.progress=false", f"data.cache_dir={d / 'data'}", f"train.run_dir={d / 'tiny'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=50257, initializer_range=0.2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d / "llama-hf")
    res = CliRunner().invoke(main, ["convert", str(d / "llama-hf"), str(d / "llama")])
    assert res.exit_code == 0, res.output
    return d / "tiny" / "model", d / "llama", [based_task_yaml(d, "swde"), based_task_yaml(d, "fda")]


def _eval(*args, env=None):
    return CliRunner().invoke(main, ["eval", *map(str, args)], env=env)


def test_models_x_tasks_table_and_records(setup, tmp_path):
    tiny, llama, tasks = setup
    out = tmp_path / "out"
    res = _eval("-m", tiny, "-m", llama, "-t", tasks[0], "-t", tasks[1], "--dtype", "float32", "--device", "cpu",
                "--batch-size", "2", "--output-dir", out, "--log-samples", env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    for text in (str(tiny), str(llama), "based_swde/contains", "based_fda/contains", "Based paper"):
        assert text in res.output
    rec = json.loads((out / "results.json").read_text())
    assert rec["lm_eval_version"] == "0.4.13" and rec["dtype"] == "float32" and rec["batch_size"] == 2
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", rec["seqmix_commit"])
    assert [(r["model"], r["task"]) for r in rec["results"]] == [
        (str(m), t) for m in (tiny, llama) for t in ("based_swde", "based_fda")]
    rows = [json.loads(line) for line in RECALL.read_text().splitlines()]
    for r in rec["results"]:
        assert r["variant"] == "Based paper (prompt and gold as stored)" and r["examples"] == len(rows)
        # the score is the mean of the per-sample matches lm-eval logged, each recomputed here from its text
        (samples,) = (out / "lm-eval").glob(f"{_sanitized(r['model'])}/samples_{r['task']}_*.jsonl")
        logged = [json.loads(line) for line in samples.read_text().splitlines()]
        again = [int(re.search(re.escape(s["doc"]["value"]), s["filtered_resps"][0], re.I) is not None)
                 for s in logged]
        assert [s["contains"] for s in logged] == again
        assert r["metrics"]["contains"]["value"] == pytest.approx(sum(again) / len(again))
        assert rec["table"]["rows"][r["model"]][f"{r['task']}/contains"] == r["metrics"]["contains"]["value"]
    md = (out / "results.md").read_text()
    assert "| model | based_swde/contains | based_fda/contains |" in md and "lm-eval 0.4.13" in md


def test_two_worker_processes_give_the_in_process_rows(setup, tmp_path):
    from seqmix.eval.parallel import run_parallel
    from seqmix.eval.runner import EvalSettings, Evaluator

    tiny, _, tasks = setup
    settings = EvalSettings(models=[str(tiny)], tasks=[str(t) for t in tasks], output_dir=str(tmp_path),
                            dtype="float32", device="cpu", batch_size=2)
    events = []
    run_parallel(settings, ["", ""], events.append)  # "": a worker with no GPU
    results = {e["index"]: e["rows"] for e in events if e["event"] == "result"}
    assert sorted(results) == [0, 1] and not [e for e in events if e["event"] == "error"]
    assert {e["worker"] for e in events} == {0, 1}  # both workers took a config
    ev = Evaluator(settings)
    assert [results[i] for i in (0, 1)] == [ev.run(i, m, t) for i, (m, t) in enumerate(settings.configs())]


def test_bad_arguments_get_one_line_errors(setup, tmp_path):
    tiny, _, tasks = setup
    res = _eval("-m", tiny, "-t", "no_such_task", "--output-dir", tmp_path)
    assert res.exit_code == 2 and "unknown task(s) no_such_task" in res.output
    res = _eval("-m", tmp_path / "missing", "-t", tasks[0])
    assert res.exit_code == 2 and "no model directory" in res.output
    res = _eval("-m", tiny, "-t", tasks[0], "-p", env={"CUDA_VISIBLE_DEVICES": ""})
    assert res.exit_code == 2 and "no GPU is visible" in res.output
    res = _eval("-m", tiny)
    assert res.exit_code == 2 and "at least one -m MODEL and one -t TASK" in res.output
    assert "Traceback" not in res.output


def test_a_config_that_fails_is_recorded_and_the_others_still_run(setup, tmp_path):
    tiny, _, tasks = setup
    broken = tmp_path / "broken"
    broken.mkdir()  # a directory without config.json
    res = _eval("-m", broken, "-m", tiny, "-t", tasks[0], "--dtype", "float32", "--device", "cpu", "--limit", "2",
                "--output-dir", tmp_path / "out", env={"COLUMNS": "300"})
    assert res.exit_code == 1
    assert f"{broken} x {tasks[0]} failed" in res.output and "config.json not found" in res.output
    rec = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [e["model"] for e in rec["errors"]] == [str(broken)]
    assert [(r["model"], r["examples"]) for r in rec["results"]] == [(str(tiny), 2)]


def _sanitized(model: str) -> str:
    from lm_eval.utils import sanitize_model_name  # how lm-eval names a model's output folder

    return sanitize_model_name(model)
