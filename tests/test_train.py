"""End-to-end training on the CPU through `recipes/pretrain.py`: ZeRO 1/2/3, two processes through the DeepSpeed
launcher, resume after an interruption, NaN handling, the exported model directory, and what a start refuses (an
infinite gradient norm, a run directory in use, a different model on resume, a bad spec, too little data).

Every run is the tiny recipe shortened (64-token windows, 20 steps) in a subprocess, as a user would start it.
The runs share one order of batches, so their loss curves must agree step for step."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deepspeed  # noqa: F401  (make install-test installs it)

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "recipes" / "pretrain.py"
FAST = ["data.seq_len=64", "optim.warmup_steps=2", "train.steps=20", "train.eval_every=10", "train.eval_batches=2",
        "train.save_every=10", "log.progress=false"]
RTOL = 1e-4  # loss agreement between ZeRO stages / world sizes (fp32; only reduction order differs)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONWARNINGS"] = "ignore::FutureWarning"
    env["OMP_NUM_THREADS"] = "1"  # tiny ops: threads only add overhead (and spin when the machine is busy)
    # These tests check the CPU path CI runs. On a GPU machine keep them there too: a 2-rank run must not ask
    # for 2 GPUs the machine may not have, and the 1-rank reference must run where the 2-rank one does.
    env["DS_ACCELERATOR"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def _run(run_dir: Path, cache: Path, *args: str, launcher=(), rc: int = 0) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), str(PRETRAIN), "--recipe", "tiny", *FAST,
           f"data.cache_dir={cache}", f"train.run_dir={run_dir}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == rc, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _metrics(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in recs if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in recs if "eval_loss" in r}
    assert len(train) == sum("loss" in r for r in recs), "a step was logged twice"
    return train, evals


def _close(a: dict[int, float], b: dict[int, float], steps) -> None:
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=RTOL), f"step {s}: {a[s]} vs {b[s]}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache) -> Path:
    """20 uninterrupted steps at ZeRO-1, one process: the reference curve."""
    run_dir = tmp_path_factory.mktemp("runs") / "straight"
    _run(run_dir, cache, "zero.stage=1")
    return run_dir


def test_tiny_recipe_trains_and_exports_a_loadable_model(straight, cache):
    from seqmix.io import load
    from seqmix.tokenizer import recorded_tokenizer
    from seqmix.train.data import PackedTokens, get_batch, prepare_data
    from seqmix.train.schema import load_recipe

    losses, evals = _metrics(straight)
    assert sorted(losses) == list(range(1, 21)) and sorted(evals) == [10, 20]
    assert all(map(lambda v: v == v, losses.values()))
    assert losses[1] > 5.0 and max(losses[18], losses[19], losses[20]) < losses[1] - 1.5  # from ~ln(257)
    assert evals[20] < evals[10] < losses[1]
    model_dir = straight / "model"
    assert recorded_tokenizer(model_dir) == "bytes"
    assert (straight / "recipe.yaml").is_file() and json.loads((straight / "ds_config.json").read_text())[
        "gradient_accumulation_steps"] == 2
    # The exported weights are the trained ones: their loss on the eval samples is the logged eval loss.
    model = load(model_dir)
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", FAST + [f"data.cache_dir={cache}"])
    val = PackedTokens(prepare_data(recipe.data), "val", 64)
    with torch.no_grad():
        x, y = get_batch(val, list(range(16)))
        loss = sum(model.loss(x[i:i + 4], y[i:i + 4]).item() for i in range(0, 16, 4)) / 4
    assert loss == pytest.approx(evals[20], rel=1e-5)
    assert len(list((straight / "checkpoints").glob("step*"))) == 2 and (straight / "checkpoints/latest").read_text() \
        == "step00000020"


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_2_and_3_give_the_same_loss_curve(straight, cache, tmp_path, stage):
    from safetensors.torch import load_file

    steps = 20 if stage == 3 else 10  # ZeRO-3 runs to the end: its export gathers partitioned parameters
    _run(tmp_path / "run", cache, f"zero.stage={stage}", "--stop-after", str(steps))
    losses, evals = _metrics(tmp_path / "run")
    ref, ref_evals = _metrics(straight)
    assert sorted(losses) == list(range(1, steps + 1))
    _close(losses, ref, range(1, steps + 1))
    _close(evals, ref_evals, [10])
    if stage == 3:
        a, b = load_file(tmp_path / "run/model/model.safetensors"), load_file(straight / "model/model.safetensors")
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in b)


def test_two_processes_through_the_deepspeed_launcher_match_one(straight, cache, tmp_path):
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                "--master_port", str(_free_port())]
    proc = _run(tmp_path / "run", cache, "zero.stage=2", "--stop-after", "10", launcher=launcher)
    assert "world 2 x micro 4 x accum 1" in proc.stdout
    losses, evals = _metrics(tmp_path / "run")
    ref, ref_evals = _metrics(straight)
    _close(losses, ref, range(1, 11))
    _close(evals, ref_evals, [10])
    assert len(list((tmp_path / "run/checkpoints/step00000010").glob("rng_rank*.pt"))) == 2


def test_an_interrupted_run_resumes_on_the_same_curve(straight, cache, tmp_path):
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    _run(run_dir, cache, "zero.stage=1", "--stop-after", "10")
    # A save that died half-way must never be picked up: it is ignored, then removed.
    stale = run_dir / "checkpoints" / ".tmp-step00000015"
    stale.mkdir()
    (stale / "mp_rank_00_model_states.pt").write_bytes(b"half a file")
    proc = _run(run_dir, cache, "zero.stage=1")
    assert "resuming" in proc.stdout and "from step 10" in proc.stdout and not stale.exists()
    losses, evals = _metrics(run_dir)
    ref, ref_evals = _metrics(straight)
    assert sorted(losses) == list(range(1, 21))
    for s in range(1, 21):  # same batches, same optimizer state, same RNG: the very same numbers
        assert losses[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-6), f"step {s}: {losses[s]} vs {ref[s]}"
    assert evals[20] == pytest.approx(ref_evals[20], rel=1e-6)
    a, b = load_file(run_dir / "model/model.safetensors"), load_file(straight / "model/model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in b)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_a_run_resumes_on_another_world_size_on_the_same_curve(straight, cache, tmp_path, before, after):
    """Stopped after 10 steps on `before` processes, continued on `after`: the checkpoint is converted once into
    DeepSpeed's universal format and the curve is the uninterrupted one (the batch of a step depends only on the
    seed and the step; world sizes differ only in reduction order)."""
    def launcher(n):
        return () if n == 1 else [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n),
                                  "--master_port", str(_free_port())]

    run_dir = tmp_path / "run"
    _run(run_dir, cache, "zero.stage=1", "--stop-after", "10", launcher=launcher(before))
    proc = _run(run_dir, cache, "zero.stage=1", launcher=launcher(after))
    out = " ".join(proc.stdout.split())
    assert "from step 10" in out and f"written by {before} ranks, continued by {after}" in out, out[-2000:]
    assert (run_dir / "checkpoints/step00000010/universal").is_dir()
    losses, evals = _metrics(run_dir)
    ref, ref_evals = _metrics(straight)
    assert sorted(losses) == list(range(1, 21))
    _close(losses, ref, range(1, 21))
    _close(evals, ref_evals, [10, 20])


def test_a_zero3_run_cannot_change_its_world_size_on_resume(cache, tmp_path):
    run_dir = tmp_path / "run"
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port())]
    _run(run_dir, cache, "zero.stage=3", "train.steps=10", "--stop-after", "10", launcher=launcher)
    proc = _run(run_dir, cache, "zero.stage=3", "train.steps=10", rc=2)
    err = " ".join(proc.stderr.split())
    assert "written by 2 ranks and this run has 1" in err and "Resume it on 2 ranks" in err and "Traceback" not in err
    assert not (run_dir / "checkpoints/step00000010/universal").exists()


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(cache, tmp_path):
    run_dir = tmp_path / "run"
    proc = _run(run_dir, cache, "optim.lr=1e30", "optim.min_lr=0", "optim.warmup_steps=0", "train.save_every=1",
                rc=3)
    err = " ".join(proc.stderr.split())
    assert "loss is nan at step 2" in err and "step00000001" in err
    assert (run_dir / "checkpoints/latest").read_text() == "step00000001"
    assert not (run_dir / "checkpoints/step00000002").exists() and not (run_dir / "model").exists()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_an_infinite_gradient_norm_stops_the_run_naming_the_step(cache, tmp_path, dtype):
    # lr 1e6 (after one warmup step at 5e4): the loss stays finite but every gradient overflows from step 2 on.
    # bf16: DeepSpeed's own overflow check is off (ds_config), so this guard is what stops the run.
    run_dir = tmp_path / "run"
    proc = _run(run_dir, cache, "optim.lr=1e6", "train.steps=4", "train.save_every=1", f"train.dtype={dtype}", rc=3)
    err = " ".join(proc.stderr.split())
    assert "the gradient norm is inf at step 2" in err and "step00000001" in err, err
    assert not (run_dir / "checkpoints/step00000002").exists() and not (run_dir / "model").exists()
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_second_run_on_a_run_directory_in_use_is_refused_naming_the_holder(cache, tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from seqmix.train.runlock import RunDirLock
lock = RunDirLock({str(run_dir)!r})
print("held", flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = _run(run_dir, cache, rc=2)
        err = " ".join(proc.stderr.split())
        assert f"is in use by another training run (pid {holder.pid} on host" in err and "train.run_dir" in err
        assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
    finally:
        holder.kill()


def test_resuming_with_a_different_model_is_refused_before_loading(straight, cache, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    proc = _run(run_dir, cache, "model.d_model=64", rc=2)
    err = " ".join(proc.stderr.split())
    assert "holds a checkpoint of a different run (model.d_model: 128 -> 64)" in err and "Traceback" not in err


def test_a_bad_spec_is_refused_before_deepspeed_starts(cache, tmp_path):
    proc = _run(tmp_path / "run", cache, "model.spec=basd,mlp", rc=2)
    assert "recipe error: model.spec: unknown mixer 'basd'" in proc.stderr and "Did you mean 'based'" in proc.stderr
    assert "DeepSpeed" not in proc.stdout + proc.stderr and not (tmp_path / "run").exists()


def test_data_shorter_than_one_sample_is_a_message(cache, tmp_path):
    (tmp_path / "small.txt").write_text("To be, or not to be, that is the question. " * 10)
    proc = _run(tmp_path / "run", cache, "data.source=files", f"data.files=[{tmp_path / 'small.txt'}]",
                "data.seq_len=1024", rc=2)
    err = " ".join(proc.stderr.split())
    assert "error: data.seq_len=1024 needs samples of 1025 tokens" in err and "Traceback" not in err


def test_the_training_benchmark_prints_a_table(tmp_path):
    """On a CPU: the seqmix rows (no Llama peer, no profile), DeepSpeed and the plain loop, eager."""
    cmd = [sys.executable, str(ROOT / "kernels/bench/bench_train.py"), "--recipes", "tiny", "--seq-lens", "32",
           "--tokens-per-step", "64", "--steps", "2", "--warmup", "1", "--llama", "--engines", "ds1", "plain",
           "--compile", "off", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| seqmix tiny, DeepSpeed ZeRO-1, eager | 32 | 2 | 544,000 | 2 |" in proc.stdout
    assert "| seqmix tiny, plain loop, eager | 32 | 2 | 544,000 | 2 |" in proc.stdout
    rows = json.loads((tmp_path / "train.json").read_text())["rows"]
    assert [r["engine"] for r in rows] == ["ds1", "plain"]
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["mfu"] is None and row["loss"] == row["loss"], row
    assert abs(rows[0]["loss"] - rows[1]["loss"]) < 1e-4 * rows[0]["loss"]  # the same batches, the same arithmetic
