"""DeepSpeed's CPU communication op: a world of one never waits for it, each environment builds its own copy, and a
lock left by a killed build is removed (seqmix's folder) or named (a folder you chose) instead of hanging."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import deepspeed  # noqa: F401  (make install-test installs it)

from seqmix.train import ds_ops  # noqa: E402

OP = "deepspeed_shm_comm"


class FakeBuilder:
    """Stands in for DeepSpeed's ShareMemCommBuilder: loading it only counts (no 2-minute compile)."""

    NAME = OP

    def __init__(self):
        self.loads = 0

    def load(self):
        self.loads += 1
        return "the op"


def _stale(folder: Path) -> Path:
    (folder / OP).mkdir(parents=True)
    lock = folder / OP / "lock"
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    return lock


def _clean_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCH_EXTENSIONS_DIR")}
    env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", XDG_CACHE_HOME=str(tmp_path / "cache"), **extra)
    return env


def test_a_world_of_one_starts_without_the_op_even_behind_a_stale_lock(tmp_path):
    # A killed build's lock used to make every later start wait forever, silently.
    chosen = tmp_path / "ext"
    lock = _stale(chosen)
    code = textwrap.dedent("""
        import os, sys
        from seqmix.train.dist import init_distributed, shutdown
        print(init_distributed(), os.environ["TORCH_EXTENSIONS_DIR"])
        shutdown()
    """)
    for env in (_clean_env(tmp_path, TORCH_EXTENSIONS_DIR=str(chosen)), _clean_env(tmp_path)):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "(0, 1, 0)" in proc.stdout
    assert lock.exists() and sorted(p.name for p in (chosen / OP).iterdir()) == ["lock"]  # nothing was built
    own = Path(proc.stdout.split()[-1])  # without TORCH_EXTENSIONS_DIR: this environment's own folder
    assert own.parent == tmp_path / "cache" / "torch_extensions" and own == _env_dir(tmp_path)


def _env_dir(tmp_path) -> Path:
    code = "from seqmix.train.ds_ops import env_extensions_dir; print(env_extensions_dir())"
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(tmp_path), capture_output=True, text=True)
    return Path(out.stdout.strip())


def test_each_environment_gets_its_own_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    here = ds_ops.env_extensions_dir()
    monkeypatch.setattr(sys, "prefix", "/some/other/venv")
    other = ds_ops.env_extensions_dir()
    assert here != other and here.parent == other.parent and other.name.startswith("py3") and "venv" in other.name


def test_a_stale_lock_in_seqmix_own_folder_is_removed_and_said(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lock = _stale(ds_ops.env_extensions_dir())
    said, builder = [], FakeBuilder()
    assert ds_ops.build_comm_op(builder, log=said.append) == "the op" and builder.loads == 1
    assert not lock.exists() and str(lock) in said[0] and "killed" in said[0]


def test_a_stale_lock_in_a_chosen_folder_is_named_not_waited_for(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = _stale(tmp_path)
    builder = FakeBuilder()
    with pytest.raises(ds_ops.StaleBuildLock, match=f"rm {lock}"):
        ds_ops.build_comm_op(builder)
    assert lock.exists() and builder.loads == 0


def test_a_killed_builder_never_blocks_the_next_one(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        f = open({str(tmp_path / (OP + '.seqmix-lock'))!r}, "a+")
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(f"pid {{os.getpid()}} (a build in progress)"); f.flush()
        print("locked", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        said = []
        with pytest.raises(TimeoutError, match=f"pid {holder.pid}"):  # a live build is waited for, by name
            ds_ops.build_comm_op(FakeBuilder(), log=said.append, wait_s=1)
        assert f"waiting for pid {holder.pid}" in said[0]
        os.kill(holder.pid, signal.SIGKILL)  # killed mid-build: the OS releases its lock
        holder.wait(timeout=30)
        builder = FakeBuilder()
        assert ds_ops.build_comm_op(builder, wait_s=30) == "the op" and builder.loads == 1
    finally:
        if holder.poll() is None:
            holder.kill()
