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
    assigned: dict[int, Optional[int]] = {}  # worker -> the config it is running

    def hand_out(w: int) -> None:
        assigned[w] = None
        p = workers[w][0]
        nxt = next(pending, None) if p.poll() is None else None
        try:
            if nxt is None:
                p.stdin.close()
                return
            i, (model, task) = nxt
            p.stdin.write(json.dumps({"index": i, "model": model, "task": task}) + "\n")
            p.stdin.flush()
            assigned[w] = i
        except (BrokenPipeError, OSError):  # it died meanwhile: its exit event reports it
            if nxt is not None:
                assigned[w] = nxt[0]

    for w in range(len(workers)):
        hand_out(w)
    reported: set[int] = set()
    alive = len(workers)
    while alive:
        ev = events.get()
        w = ev["worker"]
        if ev["event"] == "exit":
            alive -= 1
            if assigned.get(w) is not None:  # died with a config in hand
                reported.add(assigned[w])
                on_event({"event": "error", "worker": w, "index": assigned[w],
                          "message": f"worker {w} exited with status {ev['status']} (see "
                                     f"{out_dir / f'worker-{w}.log'})"})
                assigned[w] = None
            continue
        on_event(ev)
        if ev["event"] in ("result", "error"):
            reported.add(ev["index"])
            hand_out(w)
    for i, _ in configs:  # left over when every worker died
        if i not in reported:
            on_event({"event": "error", "worker": None, "index": i,
                      "message": f"not run: every worker exited (see {out_dir}/worker-*.log)"})
    for p, log in workers:
        p.wait()
        log.close()


def _pump(w: int, p: subprocess.Popen, events: "queue.Queue[Event]") -> None:
    """Forward one worker's stdout events to the parent's queue, then its exit."""
    for line in p.stdout:
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        ev["worker"] = w
        events.put(ev)
    events.put({"event": "exit", "worker": w, "status": p.wait()})


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
