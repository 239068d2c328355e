"""`seqmix eval -p`: one worker process per GPU, each running whole (model, task) configs handed out one at a time.

The parent starts `python -m seqmix.eval.parallel` once per GPU with CUDA_VISIBLE_DEVICES set to that GPU, sends
the settings and then one config per line on its stdin, and reads JSON events from its stdout: progress of the
running config's requests, its result rows, or its error. A worker that finishes a config gets the next one, so
long and short configs balance; closing stdin ends it. Worker logs (lm-eval's) go to output_dir/worker-<gpu>.log.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

from seqmix.eval.runner import EvalSettings

Event = dict  # {"event": "progress" | "result" | "error" | "exit", "worker": int, "index": int, ...}


def visible_gpus() -> list[str]:
    """The GPU ids a worker can be pinned to: CUDA_VISIBLE_DEVICES's entries, else 0..device_count-1."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def run_parallel(settings: EvalSettings, gpus: list[str], on_event: Callable[[Event], None]) -> None:
    """Run every config of `settings` over one worker per entry of `gpus` (a CUDA_VISIBLE_DEVICES value each;
    "" pins a worker to the CPU). `on_event` sees every event in the parent's thread."""
    configs = list(enumerate(settings.configs()))
    events: "queue.Queue[Event]" = queue.Queue()
    out_dir = Path(settings.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = []
    for w, gpu in enumerate(gpus[: len(configs)]):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, PYTHONUNBUFFERED="1")
        log = open(out_dir / f"worker-{w}.log", "w")
        p = subprocess.Popen([sys.executable, "-m", "seqmix.eval.parallel"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        p.stdin.write(json.dumps(settings.to_dict()) + "\n")
        threading.Thread(target=_pump, args=(w, p, events), daemon=True).start()
        workers.append((p, log))
    pending = iter(configs)

    def hand_out(w: int) -> bool:
        nxt = next(pending, None)
        p = workers[w][0]
        if nxt is None:
            p.stdin.close()
            return False
        i, (model, task) = nxt
        p.stdin.write(json.dumps({"index": i, "model": model, "task": task}) + "\n")
        p.stdin.flush()
        return True

    busy = sum(hand_out(w) for w in range(len(workers)))
    alive = len(workers)
    while alive:
        ev = events.get()
        if ev["event"] == "exit":
            alive -= 1
            if ev.get("running") is not None:  # died mid-config: report it, the rest go to the others
                on_event({"event": "error", "worker": ev["worker"], "index": ev["running"],
                          "message": f"worker {ev['worker']} exited with status {ev['status']} (see "
                                     f"{out_dir / ('worker-%d.log' % ev['worker'])})"})
            continue
        on_event(ev)
        if ev["event"] in ("result", "error"):
            busy -= 1
            busy += hand_out(ev["worker"])
    for p, log in workers:
        p.wait()
        log.close()


def _pump(w: int, p: subprocess.Popen, events: "queue.Queue[Event]") -> None:
    """Forward one worker's stdout events; on its exit, say so (with the config it was running, if any)."""
    running: Optional[int] = None
    for line in p.stdout:
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        ev["worker"] = w
        running = ev["index"] if ev["event"] == "progress" else None if ev["event"] in ("result", "error") else running
        events.put(ev)
    events.put({"event": "exit", "worker": w, "status": p.wait(), "running": running})


def _worker() -> None:
    """The worker loop: settings on the first stdin line, then configs until stdin closes."""
    events = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr  # lm-eval prints; only events go to the parent's pipe
    from seqmix.eval.runner import Evaluator

    settings = EvalSettings(**json.loads(sys.stdin.readline()))
    evaluator = Evaluator(settings)

    def emit(ev: dict) -> None:
        events.write(json.dumps(ev, default=str) + "\n")

    for line in sys.stdin:
        job = json.loads(line)
        i = job["index"]
        emit({"event": "progress", "index": i, "done": 0, "total": 0})
        try:
            rows = evaluator.run(i, job["model"], job["task"],
                                 lambda idx, done, total: emit({"event": "progress", "index": idx, "done": done,
                                                                "total": total}))
            emit({"event": "result", "index": i, "rows": rows})
        except Exception as e:  # one config failing must not stop the others
            import traceback

            traceback.print_exc()
            emit({"event": "error", "index": i, "message": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    _worker()
