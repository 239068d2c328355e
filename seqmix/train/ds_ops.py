"""DeepSpeed's compiled CPU communication op: a build folder per environment, skipped where unused, stale locks named.

On the CPU accelerator `deepspeed.init_distributed` JIT-compiles its shared-memory op (`deepspeed_shm_comm`,
about 2 minutes) through torch's cpp_extension, which waits for as long as a `lock` file exists in the build
folder. Three things go wrong with that, and `prepare_comm_op` (called before DeepSpeed starts) handles each:

* The default folder (~/.cache/torch_extensions/pyXY_cpu) is shared by every environment on the machine, and the
  build file embeds the environment's paths, so each venv rebuilds the others' copy. Unless TORCH_EXTENSIONS_DIR
  is set, seqmix points it at a folder of this environment's own (a cache location: nothing else changes).
* DeepSpeed uses the op only for `inference_all_reduce` across ranks; a world of one never needs it, so it is
  marked unavailable there (DeepSpeed's `__compatible_ops__` table, which it keeps for such edits) and skipped.
* A build killed mid-way (kill -9, OOM, a CI timeout) leaves its `lock` behind and every later start waits
  forever with no output. seqmix builds under an OS file lock (released when its holder dies), so a `lock`
  found while holding it was left by a dead build: in seqmix's own folder it is removed (and said so); in a
  folder you chose it is reported with its path for you to delete.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Optional

_log = logging.getLogger(__name__)
SHM_BUILDER = "ShareMemCommBuilder"
ENV_VAR = "TORCH_EXTENSIONS_DIR"


class StaleBuildLock(RuntimeError):
    """A lock file left by a killed op build, in a folder seqmix does not own; the message names it."""


def env_extensions_dir() -> Path:
    """This environment's own folder under torch's default extensions root (one per sys.prefix)."""
    from torch.utils.cpp_extension import get_default_build_root

    tag = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:10]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path(get_default_build_root()) / f"{py}-{Path(sys.prefix).name}-{tag}"


def use_env_extensions_dir() -> tuple[Path, bool]:
    """Point TORCH_EXTENSIONS_DIR at this environment's folder unless it is set; returns (folder, ours)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]), False
    path = env_extensions_dir()
    os.environ[ENV_VAR] = str(path)
    return path, True


def prepare_comm_op(world_size: int, log: Callable[[str], None] = _log.warning) -> None:
    """Before `deepspeed.init_distributed`: skip the shared-memory op for a world of one, else build it (once per
    environment, under a lock that cannot go stale) so DeepSpeed finds it built."""
    use_env_extensions_dir()
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(SHM_BUILDER)
    if builder is None:  # not the CPU accelerator: nothing is compiled at start
        return
    if world_size == 1:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False
        return
    if deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        build_comm_op(builder, log)


def build_comm_op(builder=None, log: Callable[[str], None] = _log.warning, wait_s: Optional[float] = None):
    """Compile (or load the compiled) shared-memory op into this environment's folder, one process at a time.
    `make install-test` calls it once so no test pays for the build. `wait_s`: give up waiting for another
    process's build after that long (None: wait, as a build takes minutes)."""
    root, ours = use_env_extensions_dir()
    if builder is None:
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder(SHM_BUILDER)
        if builder is None:
            return None
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{builder.NAME}.seqmix-lock", "a+") as guard:
        _lock(guard, root / builder.NAME, log, wait_s)
        guard.seek(0)
        guard.truncate()
        guard.write(f"pid {os.getpid()} on {socket.gethostname()}, building since {time.ctime()}\n")
        guard.flush()
        baton = root / builder.NAME / "lock"
        if baton.exists():  # nobody building under our lock: a killed build left it
            age = time.time() - baton.stat().st_mtime
            if not ours:
                raise StaleBuildLock(
                    f"{baton} was left by a build of DeepSpeed's {builder.NAME} op that did not finish "
                    f"({age / 60:.0f} minutes old) and torch waits for it forever; if no other program is "
                    f"compiling into {ENV_VAR}={root} now, delete it (rm {baton}) and start again")
            baton.unlink()
            log(f"removed {baton}, a lock left {age / 60:.0f} minutes ago by a build that was killed")
        return builder.load()


def _lock(guard, folder: Path, log: Callable[[str], None], wait_s: Optional[float]) -> None:
    try:
        fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    guard.seek(0)
    holder = guard.read().strip() or "another process"
    log(f"waiting for {holder} to finish compiling DeepSpeed's op in {folder}")
    deadline = None if wait_s is None else time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{holder} is still compiling DeepSpeed's op in {folder}") from None
            time.sleep(0.5)
