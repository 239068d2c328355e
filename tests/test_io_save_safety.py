"""Saving never loses data (issue 18, items 1 and 12): what seqmix.io.save, `seqmix build --save`, `seqmix convert` and
the training export refuse or keep, leftovers of killed saves cleaned, concurrent saves to one folder, folder modes."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from seqmix.cli import main
from seqmix.config import resolve_model
from seqmix.io import SaveRefusedError, load, save
from seqmix.io.publish import clean_leftovers
from seqmix.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(resolve_model("conv,mlp", d_model=16, n_heads=2, vocab_size=64))


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in r.output
    return r


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def user_folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    (path / "data").mkdir()
    (path / "data" / "rows.csv").write_text("1,2\n")
    return path


def unchanged_user_folder(path: Path) -> bool:
    return (path / "notes.txt").read_text() == "mine" and (path / "data" / "rows.csv").read_text() == "1,2\n"


# -- item 1: data loss ----------------------------------------------------------------------------------
def test_save_refuses_a_folder_that_is_not_a_seqmix_model_naming_its_files(tmp_path):
    d = user_folder(tmp_path / "d")
    with pytest.raises(SaveRefusedError, match=r"not a seqmix model directory: it holds data, notes.txt"):
        save(tiny(), d)
    assert unchanged_user_folder(d) and sorted(p.name for p in d.iterdir()) == ["data", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp folder left


def test_save_over_a_seqmix_model_replaces_only_its_own_files(tmp_path):
    d = save(tiny(0), tmp_path / "m", max_shard_size="6KB")  # sharded
    assert len(list(d.glob("model-*-of-*.safetensors"))) >= 3
    (d / "README.md").write_text("model card")
    (d / "eval").mkdir()
    (d / "eval" / "results.json").write_text("{}")
    (d / "tokenizer_config.json").write_text('{"tokenizer": "bytes"}')  # the replaced model's: goes with it
    os.chmod(d, 0o750)
    new = tiny(1)
    with pytest.raises(SaveRefusedError, match="already holds a seqmix model.*--overwrite"):
        save(new, d, overwrite=False)
    save(new, d)  # overwrite=True is the default (as for save_pretrained)
    assert sorted(p.name for p in d.iterdir()) == ["README.md", "config.json", "eval", "model.safetensors"]
    assert (d / "README.md").read_text() == "model card" and (d / "eval" / "results.json").read_text() == "{}"
    assert same_weights(load(d), new) and (d.stat().st_mode & 0o777) == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_build_save_refuses_a_user_folder_and_needs_overwrite_for_a_model(tmp_path):
    d = user_folder(tmp_path / "d")
    r = run("build", "conv,mlp", "--d-model", "16", "--heads", "2", "--vocab", "64", "--save", d)
    assert r.exit_code == 2 and "not a seqmix model directory: it holds data, notes.txt" in r.output
    assert unchanged_user_folder(d)
    m = tmp_path / "m"
    assert run("build", "conv,mlp", "--d-model", "16", "--heads", "2", "--vocab", "64", "--save", m).exit_code == 0
    (m / "README.md").write_text("card")
    before = load(m)
    r = run("build", "mlp", "--d-model", "16", "--heads", "2", "--vocab", "64", "--save", m)
    assert r.exit_code == 2 and "already holds a seqmix model" in r.output and "--overwrite" in r.output
    assert same_weights(load(m), before)  # a trained model is not replaced by random weights unasked
    r = run("build", "mlp", "--d-model", "16", "--heads", "2", "--vocab", "64", "--save", m, "--overwrite")
    assert r.exit_code == 0, r.output
    assert load(m).config.spec == "mlp" and (m / "README.md").read_text() == "card"


def test_convert_never_replaces_or_deletes_its_source(tmp_path):
    from test_convert import BASED, write_checkpoint

    src = write_checkpoint(tmp_path / "based", BASED)
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    for dst, why in ((src, "is the source checkpoint"), (tmp_path, "contains the source checkpoint")):
        r = run("convert", src, dst)
        assert r.exit_code == 2 and why in r.output, r.output
        assert {p.name: p.read_bytes() for p in src.iterdir()} == files
    m = save(tiny(), tmp_path / "m")  # a seqmix model converted onto itself, even with --overwrite
    r = run("convert", m, m, "--overwrite")
    assert r.exit_code == 2 and "is the source checkpoint" in r.output and load(m) is not None
    r = run("convert", src, tmp_path / "out")
    assert r.exit_code == 0, r.output


def test_training_export_refuses_the_run_directory_before_training_and_re_exports_its_own_model(tmp_path):
    import deepspeed  # noqa: F401  (make install-test installs it)
    from seqmix.train import ckpt
    from seqmix.train.loop import preflight
    from seqmix.train.schema import RecipeError, load_recipe

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step00000010").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    for export in (run_dir, tmp_path, run_dir / "checkpoints"):
        recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", [f"train.run_dir={run_dir}",
                                                              f"train.export_dir={export}"])
        with pytest.raises(RecipeError, match="among the run's own files|not a seqmix model directory"):
            preflight(recipe)
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "checkpoints" / "step00000010").is_dir()
    # The run's own model/ is re-exported when a finished run is started again; other files stay.
    out = run_dir / "model"
    ckpt.export_model(tiny(0), "bytes", out, rank=0)
    (out / "notes.txt").write_text("mine")
    model = tiny(1)
    assert ckpt.export_model(model, "bytes", out, rank=0) == out
    assert same_weights(load(out), model) and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer"] == "bytes"
    with pytest.raises(SaveRefusedError):
        ckpt.export_model(model, "bytes", run_dir, rank=0)
    assert (run_dir / "metrics.jsonl").is_file()


# -- item 12: leftovers, races, modes -------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_killed_save_leaves_a_hidden_folder_the_next_save_removes(tmp_path):
    d = tmp_path / "m"
    save(tiny(0), d)
    killer = f"""
import os, signal, safetensors.torch
from seqmix.config import resolve_model
from seqmix.io import save
from seqmix.model import build_model
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
safetensors.torch.save_file = die
save(build_model(resolve_model("conv,mlp", d_model=16, n_heads=2, vocab_size=64)), {str(d)!r})
"""
    assert subprocess.run([sys.executable, "-c", killer]).returncode == -9
    left = [p.name for p in tmp_path.iterdir() if p.name != "m"]
    assert len(left) == 1 and left[0].startswith(".m.tmp-")
    (tmp_path / f".m.old-{_dead_pid()}-0123abcd").mkdir()  # killed between its two renames
    (tmp_path / ".m.tmp-k3j_x9q2").mkdir()  # the name older seqmix versions used
    (tmp_path / f".m.tmp-{os.getpid()}-89abcdef").mkdir()  # this process may still be writing it
    other = tmp_path / f".other.tmp-{_dead_pid()}-0123abcd"  # another target's: left to saves of that one
    other.mkdir()
    new = tiny(1)
    save(new, d)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".m.tmp-{os.getpid()}-89abcdef", other.name, "m"]
    assert same_weights(load(d), new)


def test_an_old_copy_left_between_the_two_renames_is_put_back(tmp_path):
    save(tiny(0), tmp_path / "m")
    old = tmp_path / f".m.old-{_dead_pid()}-0123abcd"
    os.rename(tmp_path / "m", old)
    assert clean_leftovers(tmp_path / "m") == [old]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and same_weights(load(tmp_path / "m"), tiny(0))


def test_concurrent_saves_to_one_folder_all_succeed(tmp_path):
    d = tmp_path / "m"
    models = [tiny(i) for i in range(8)]
    start, errors = threading.Barrier(len(models)), []

    def writer(m):
        try:
            start.wait()
            save(m, d, max_shard_size="6KB" if models.index(m) % 2 else "5GB")
        except Exception as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = load(d)
    assert any(same_weights(got, m) for m in models)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_concurrent_saves_from_processes(tmp_path):
    d = tmp_path / "m"
    code = f"""
import sys, torch
from seqmix.config import resolve_model
from seqmix.io import save
from seqmix.model import build_model
torch.manual_seed(int(sys.argv[1]))
m = build_model(resolve_model("conv,mlp", d_model=16, n_heads=2, vocab_size=64))
for _ in range(5):
    save(m, {str(d)!r}, max_shard_size="6KB" if int(sys.argv[1]) % 2 else "5GB")
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert load(d) is not None and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_saved_folders_take_their_mode_from_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        d = save(tiny(), tmp_path / "m")
    finally:
        os.umask(old)
    assert d.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in d.iterdir())
