"""MQAR sweeps: plan the runs (spec x d_model x lr), skip those results.jsonl already holds, run the rest (in this
process or in worker processes sharing the GPUs), and record each finished run atomically."""
from __future__ import annotations

import dataclasses
import json
import os
import queue
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from seqmix.synthetics.train import DataConfig, RunConfig

RESULTS = "results.jsonl"
KEY_FIELDS = ("spec_canonical", "d_model", "lr", "heads", "epochs", "batch_size", "weight_decay", "early_stop",
              "seed", "precision", "steps_per_epoch", "data")


@dataclass
class Plan:
    """The runs of a sweep, each with what it is known by before training (canonical spec, state bytes)."""

    runs: list[RunConfig]
    data: DataConfig
    meta: dict[tuple, dict] = field(default_factory=dict)  # run -> static fields of its record

    def key(self, run: RunConfig) -> str:
        return record_key(self.meta[run_id(run)])


def run_id(run: RunConfig) -> tuple:
    return dataclasses.astuple(run)


def record_key(record: dict) -> str:
    return json.dumps([record.get(k) for k in KEY_FIELDS])


def family(model) -> str:
    """The mixers of the model, in order of first appearance: "conv+based"."""
    names: list[str] = []
    for b in model.blocks:
        if b.mixer.name not in names:
            names.append(b.mixer.name)
    return "+".join(names)


def plan(points: list[tuple[str, int]], lrs: list[float], data: DataConfig, **run_fields) -> Plan:
    """Every (spec, d_model) point at every lr (all points at the first lr first); each model is built on the meta device first so a bad spec or
    size fails here, before any training, and the state sizes are known."""
    from seqmix.synthetics.state import seqmix_state_bytes, zoology_state_bytes
    from seqmix.synthetics.train import build

    data.check()
    runs, meta = [], {}
    for lr in lrs:  # lr outermost: a sweep stopped by its deadline has every point at the first lrs
        for spec, d_model in points:
            run = RunConfig(spec=spec, d_model=d_model, lr=lr, **run_fields)
            model = build(run, data, device="meta")
            L = data.max_test_len
            meta[run_id(run)] = {
                "spec": spec, "spec_canonical": model.config.spec, "family": family(model),
                **dataclasses.asdict(run), "data": data.fingerprint(), "state_len": L,
                "state_bytes": seqmix_state_bytes(model, L), "state_dtype": "float32",
                "state_bytes_zoology": zoology_state_bytes(model, L),
            }
            runs.append(run)
    return Plan(runs, data, meta)


# -- results.jsonl ---------------------------------------------------------------------------------
def load_results(out: Path) -> list[dict]:
    """The records in out/results.jsonl (a missing file is empty; a line that is not JSON is an error naming it)."""
    path = Path(out) / RESULTS
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not a JSON record ({e.msg}); fix or remove that line") from None
    return records


def write_results(out: Path, records: list[dict]) -> None:
    """Rewrite out/results.jsonl atomically (temp file + rename): a crash leaves the old or the new file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{RESULTS}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / RESULTS)


# -- execution -------------------------------------------------------------------------------------
def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def _one(run: RunConfig, data: DataConfig, cache: dict, device: str, on_epoch) -> dict:
    """Train one run on `device`, generating the sweep's data there once per process."""
    if data.fingerprint() not in cache:
        cache.clear()
        cache[data.fingerprint()] = data.generate(device)
    train, test = cache[data.fingerprint()]
    from seqmix.synthetics.train import train_run

    return train_run(run, data, train, test, device, on_epoch)


def _worker(worker: int, device: str, data: DataConfig, tasks, events) -> None:
    """Worker process: take runs from `tasks` until None, report epochs and outcomes through `events`."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    cache: dict = {}
    while True:
        item = tasks.get()
        if item is None:
            return
        idx, run = item
        try:
            rec = _one(run, data, cache, device, lambda e, a, l: events.put(("epoch", worker, idx, e, a, l)))
            events.put(("done", worker, idx, rec))
        except Exception:  # reported to the parent, which records nothing for this run and carries on
            events.put(("error", worker, idx, traceback.format_exc(limit=6)))


@dataclass
class Reporter:
    """What the sweep tells its caller (the CLI draws rich progress from these)."""

    start: Callable[[int, int, RunConfig], None] = lambda slot, idx, run: None
    epoch: Callable[[int, int, int, float, float], None] = lambda slot, idx, epoch, acc, loss: None
    done: Callable[[int, dict], None] = lambda idx, record: None
    error: Callable[[int, str], None] = lambda idx, message: None


def execute(p: Plan, out: Path, *, devices: list[str], workers: int = 1, max_minutes: Optional[float] = None,
            reporter: Optional[Reporter] = None, command: str = "") -> dict:
    """Run the runs of `p` missing from out/results.jsonl; each finished one is appended (atomically) at once.
    No run starts after `max_minutes`; the rest wait for the next invocation. Returns counts."""
    rep = reporter or Reporter()
    records = load_results(out)
    have = {record_key(r) for r in records}
    todo = [(i, r) for i, r in enumerate(p.runs) if p.key(r) not in have]
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    counts = {"planned": len(p.runs), "skipped": len(p.runs) - len(todo), "done": 0, "failed": 0, "left": 0}
    names = {d: _device_name(d) for d in set(devices)}

    def record(idx: int, result: dict, device: str) -> None:
        rec = {**p.meta[run_id(p.runs[idx])], **result, "device": names[device], "command": command,
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        records.append(rec)
        write_results(out, records)
        counts["done"] += 1
        rep.done(idx, rec)

    def may_start() -> bool:
        return deadline is None or time.monotonic() < deadline

    if workers <= 1:
        cache: dict = {}
        for n, (idx, run) in enumerate(todo):
            if not may_start():
                counts["left"] = len(todo) - n
                break
            rep.start(0, idx, run)
            try:
                rec = _one(run, p.data, cache, devices[0], lambda e, a, l: rep.epoch(0, idx, e, a, l))
            except Exception:
                counts["failed"] += 1
                rep.error(idx, traceback.format_exc(limit=6))
                continue
            record(idx, rec, devices[0])
        return counts
    return _execute_pool(p, todo, devices, workers, may_start, record, rep, counts)


def _execute_pool(p, todo, devices, workers, may_start, record, rep, counts) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    procs, queues, slot_device = [], [], {}
    for w in range(min(workers, len(todo))):
        dev = devices[w % len(devices)]
        q = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(w, dev, p.data, q, events), daemon=True)
        proc.start()
        procs.append(proc)
        queues.append(q)
        slot_device[w] = dev
    pending = list(todo)
    holding: set[int] = set()  # workers with a run in hand; the others may have exited, as told

    def feed(w: int) -> None:
        if pending and may_start():
            idx, run = pending.pop(0)
            queues[w].put((idx, run))
            holding.add(w)
            rep.start(w, idx, run)
        else:
            queues[w].put(None)

    try:
        for w in range(len(procs)):
            feed(w)
        while holding:
            try:
                ev = events.get(timeout=5)
            except queue.Empty:
                dead = [w for w in holding if not procs[w].is_alive()]
                if dead:
                    raise RuntimeError(f"worker process {dead[0]} died (exit code {procs[dead[0]].exitcode}); "
                                       f"the runs finished so far are saved, run the command again to continue")
                continue
            kind, w, idx = ev[:3]
            if kind == "epoch":
                rep.epoch(w, idx, *ev[3:])
                continue
            holding.discard(w)
            if kind == "done":
                record(idx, ev[3], slot_device[w])
            else:
                counts["failed"] += 1
                rep.error(idx, ev[3])
            feed(w)
    finally:
        for pr in procs:
            pr.join(timeout=10)
            if pr.is_alive():
                pr.terminate()
    counts["left"] = len(pending)
    return counts


def default_devices() -> list[str]:
    import torch

    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def python_command() -> str:
    return " ".join(["seqmix"] + sys.argv[1:]) if sys.argv else ""
