"""One training run per run directory: `<run_dir>/.lock` names its holder (pid, host) and is held with an OS lock.

A second run started on the same directory would interleave metrics.jsonl and overwrite checkpoints, so it is
refused with the holder named. The OS lock (flock) is released by the kernel when its process dies, however it
dies, so a lock left by a killed run is never stale: the next run takes it over and says whose it was. The file
itself stays (removing it would race with a run opening it); it is empty while nobody holds it.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Optional, Union

LOCK_NAME = ".lock"
_HELD: dict[str, "RunDirLock"] = {}  # by resolved path: a train() of this process that died without releasing


class RunDirBusy(RuntimeError):
    """Another process holds the run directory; the message names it and what to do."""


class RunDirLock:
    """Hold `run_dir` for this process until `release()` (or the process ends). Raises RunDirBusy if held.

    `previous` is the holder line a dead run left in the file (None if it was released cleanly)."""

    def __init__(self, run_dir: Union[str, Path]):
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_NAME
        key = str(self.path.resolve())
        if key in _HELD:  # an earlier train() in this very process raised before releasing it
            _HELD.pop(key).release()
        self._fd: Optional[int] = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read() or "another process"
            os.close(self._fd)
            self._fd = None
            raise RunDirBusy(
                f"{run_dir} is in use by another training run ({holder}): two runs on one directory would "
                "interleave its metrics and overwrite its checkpoints. Wait for that run to finish (or stop it), "
                "or give this one its own train.run_dir") from None
        self.previous = self._read() or None
        self.holder = f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (self.holder + "\n").encode(), 0)
        _HELD[key] = self

    def _read(self) -> str:
        return os.pread(self._fd, 4096, 0).decode("utf-8", errors="replace").strip()

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        _HELD.pop(str(self.path.resolve()), None)
