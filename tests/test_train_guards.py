"""What training refuses before it can do harm, without starting DeepSpeed: hostile or foreign checkpoint files,
a second run on one run directory, unusable training data and a model that cannot be built."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from seqmix.train import ckpt
from seqmix.train.data import DataError, prepare_data, training_split
from seqmix.train.runlock import RunDirBusy, RunDirLock
from seqmix.train.schema import DataSection, RecipeError, load_recipe

RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")


class FakeEngine:
    """Records whether DeepSpeed would have been asked to read the checkpoint."""

    def __init__(self):
        self.loaded = []

    def load_checkpoint(self, path, tag, **kw):
        self.loaded.append((path, tag))
        return os.path.join(path, tag), {}


def _checkpoint(ckpt_dir, step=5, recipe=None, rng=True):
    folder = ckpt_dir / ckpt.tag_for(step)
    folder.mkdir(parents=True)
    (folder / ckpt.STATE_NAME).write_text(json.dumps({"format": 1, "step": step, "recipe": recipe or {"x": 1}}))
    if rng:
        torch.save(ckpt.rng_state(), folder / "rng_rank00000.pt")
    (ckpt_dir / "latest").write_text(ckpt.tag_for(step))
    return folder


class _RunsCode:
    """A pickle that runs code when unpickled: what a hostile run directory could ship."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_hostile_rng_file_is_refused_and_runs_no_code(tmp_path):
    folder = _checkpoint(tmp_path / "checkpoints")
    marker = tmp_path / "pwned"
    torch.save({"torch": _RunsCode(marker)}, folder / "rng_rank00000.pt")
    engine = FakeEngine()
    with pytest.raises(ckpt.CheckpointError, match="weights_only=True") as info:
        ckpt.load_checkpoint(engine, tmp_path / "checkpoints", 0)
    assert not marker.exists() and engine.loaded == []  # refused before DeepSpeed reads its own pickles
    assert "rng_rank00000.pt" in str(info.value) and "seqmix runs no code from a run directory" in str(info.value)


def test_the_rng_state_round_trips_through_tensors_and_json(tmp_path):
    path = tmp_path / "rng.pt"
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(ckpt.rng_state(), path)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(ckpt.load_rng_state(path))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


@pytest.mark.parametrize("pointer", ["../../elsewhere/step00000005", "/tmp/step00000005", "step5", b"\xff\xfe\x00"])
def test_a_latest_pointer_to_anything_but_a_step_folder_of_this_run_is_refused(tmp_path, pointer):
    elsewhere = tmp_path / "elsewhere" / "step00000005"
    elsewhere.mkdir(parents=True)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    _checkpoint(ckpt_dir)
    (ckpt_dir / "latest").write_bytes(pointer if isinstance(pointer, bytes) else pointer.encode())
    engine = FakeEngine()
    with pytest.raises(ckpt.CheckpointError, match="should hold the name of a checkpoint folder of this run"):
        ckpt.load_checkpoint(engine, ckpt_dir, 0)
    assert engine.loaded == []


def test_a_step_folder_linking_out_of_the_run_is_refused(tmp_path):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    other = _checkpoint(tmp_path / "other" / "checkpoints", step=7)
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "step00000007").symlink_to(other)
    (ckpt_dir / "latest").write_text("step00000007")
    with pytest.raises(ckpt.CheckpointError, match="outside this run's checkpoints"):
        ckpt.load_checkpoint(FakeEngine(), ckpt_dir, 0)


def test_a_different_run_is_refused_before_deepspeed_loads_anything(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    _checkpoint(ckpt_dir, recipe={"model": {"d_model": 128}})
    engine, seen = FakeEngine(), []

    def check(saved):
        seen.append(saved)
        raise RecipeError("different model")

    with pytest.raises(RecipeError, match="different model"):
        ckpt.load_checkpoint(engine, ckpt_dir, 0, check=check)
    assert seen == [{"model": {"d_model": 128}}] and engine.loaded == []
    state = ckpt.load_checkpoint(engine, ckpt_dir, 0, check=lambda saved: None)
    assert state["step"] == 5 and engine.loaded == [(str(ckpt_dir), "step00000005")]


# -- one run per run directory --------------------------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from seqmix.train.runlock import RunDirLock
        lock = RunDirLock({str(tmp_path)!r})
        print("held", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=f"in use by another training run \\(pid {holder.pid} on host "):
            RunDirLock(tmp_path)
        os.kill(holder.pid, signal.SIGKILL)  # kill -9: no cleanup ran, the lock file still names it
        holder.wait(timeout=30)
        lock = RunDirLock(tmp_path)
        assert lock.previous.startswith(f"pid {holder.pid} on host ")
        lock.release()
        assert RunDirLock(tmp_path).previous is None  # released cleanly: nothing to report
    finally:
        if holder.poll() is None:
            holder.kill()


# -- training data --------------------------------------------------------------------------------------------
def _files(tmp_path, **texts):
    for name, text in texts.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return DataSection(source="files", tokenizer="bytes", seq_len=64, files=[str(tmp_path / "*.*")],
                       cache_dir=str(tmp_path / "cache"))


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    data = _files(tmp_path, **{"a.txt": "fine text " * 50, "b.txt": "caf\xe9 au lait".encode("latin-1")})
    with pytest.raises(DataError, match=r"b\.txt is not UTF-8 text .*offset 3.*iconv"):
        prepare_data(data)


def test_empty_files_are_an_error_naming_them(tmp_path):
    data = _files(tmp_path, **{"a.txt": "", "b.txt": "  \n\n"})
    with pytest.raises(DataError, match=r"no training tokens.*a\.txt.*b\.txt"):
        prepare_data(data)


def test_a_bad_jsonl_line_is_named(tmp_path):
    data = _files(tmp_path, **{"a.jsonl": '{"text": "ok"}\n{"text": oops}\n'})
    with pytest.raises(DataError, match=r"a\.jsonl:2 is not a JSON line"):
        prepare_data(data)


def test_seq_len_longer_than_the_text_says_how_long_it_may_be(tmp_path):
    data = _files(tmp_path, **{"a.txt": "x" * 500})
    shards = prepare_data(data)
    assert len(training_split(shards, 490)) == 1  # 500 bytes + EOS, 2% held out: 491 training tokens
    with pytest.raises(DataError, match=r"data.seq_len=4096 needs samples of 4097 tokens .*holds 491 tokens.* "
                                        r"at most 490"):
        training_split(shards, 4096)


# -- the model is checked before DeepSpeed starts -------------------------------------------------------------
@pytest.mark.parametrize("override, needle", [("model.spec=basd,mlp", "model.spec: unknown mixer 'basd'"),
                                              ("model.n_heads=3", "model: "),
                                              ("model.spec=mlp:99999999999999999999", "64-bit integer")])
def test_preflight_turns_a_model_that_cannot_be_built_into_a_recipe_error(override, needle):
    from seqmix.train.loop import preflight

    recipe = load_recipe(os.path.join(RECIPES, "tiny.yaml"), [override])
    with pytest.raises(RecipeError, match=needle):
        preflight(recipe)


def test_a_recipe_integer_beyond_int64_is_named():
    with pytest.raises(RecipeError, match="model.d_model: 99999999999999999999 does not fit in a 64-bit integer"):
        load_recipe(os.path.join(RECIPES, "tiny.yaml"), ["model.d_model=99999999999999999999"])
