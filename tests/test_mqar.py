"""MQAR (seqmix.synthetics): generator invariants and its gap law against numpy's sampler, seeds, accuracy, state
bytes, best-lr/frontier selection, and `seqmix mqar` end to end on a tiny grid (results.jsonl, PNG, restart, plot)."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from seqmix.cli import main
from seqmix.synthetics.mqar import IGNORE, Segment, generate, generate_all, query_accuracy
from seqmix.synthetics.plot import best_per_point, frontier
from seqmix.synthetics.state import seqmix_state_bytes, zoology_state_bytes
from seqmix.synthetics.sweep import execute, load_results, plan
from seqmix.synthetics.train import DataConfig, RunConfig, build, evaluate, query_logits

V = 8192


def test_generator_invariants():
    seg = Segment(64, 300, 8)
    d = generate(seg, seed=3)
    N, L = seg.n_kv, seg.seq_len
    assert d.inputs.shape == d.labels.shape == (300, L) and d.qpos.shape == d.values.shape == (300, N)
    keys, vals = d.inputs[:, 0:2 * N:2], d.inputs[:, 1:2 * N:2]
    assert keys.min() >= 1 and keys.max() < V // 2 and vals.min() >= V // 2 and vals.max() < V
    assert d.inputs.min() >= 0 and d.inputs.max() < V
    for b in range(300):
        k, v, q = keys[b].tolist(), vals[b].tolist(), d.qpos[b].tolist()
        assert len(set(k)) == N and len(set(v)) == N  # no repeated keys or values in an example
        assert len(set(q)) == N and all(p >= 2 * N and (p - 2 * N) % 2 == 0 and p < L for p in q)
        labelled = (d.labels[b] != IGNORE).nonzero().flatten().tolist()
        assert sorted(labelled) == sorted(q)  # labels only at the query positions
        assert sorted(d.inputs[b, q].tolist()) == sorted(k)  # each key queried exactly once
        pair = dict(zip(k, v))
        assert all(d.labels[b, p].item() == pair[d.inputs[b, p].item()] for p in q)  # label = the key's value
        assert d.values[b].tolist() == d.labels[b, q].tolist()


def test_gap_distribution_follows_power_law():
    """The first slot drawn follows p(g) ~ (g+1)^(a-1) exactly; the set of N slots has the inclusion frequencies of
    numpy's weighted sampling without replacement (what zoology calls)."""
    seg = Segment(64, 20_000, 4)
    S, a = (seg.seq_len - 2 * seg.n_kv) // 2, 0.01
    p = (np.arange(1, S + 1) ** (a - 1.0))
    p /= p.sum()
    slots = ((generate(seg, seed=0, power_a=a).qpos - 2 * seg.n_kv) // 2).numpy()
    first = np.bincount(slots[:, 0], minlength=S) / len(slots)
    chi2 = len(slots) * ((first - p) ** 2 / p).sum()
    assert chi2 < 80, chi2  # 28 degrees of freedom: mean 28, sd 7.5
    rng = np.random.default_rng(0)
    ref = np.stack([rng.choice(S, size=seg.n_kv, replace=False, p=p) for _ in range(20_000)])
    incl = np.bincount(slots.ravel(), minlength=S) / len(slots)
    incl_ref = np.bincount(ref.ravel(), minlength=S) / len(ref)
    assert np.abs(incl - incl_ref).max() < 0.02, np.abs(incl - incl_ref).max()
    assert incl[0] > 2 * incl[-1]  # near slots likelier: not uniform


def test_seeds_reproduce_and_splits_differ():
    seg = Segment(128, 50, 16)
    a, b, c = generate(seg, seed=7), generate(seg, seed=7), generate(seg, seed=8)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)
    tr, te = generate_all([seg], split="train"), generate_all([seg], split="test")
    assert not torch.equal(tr[0].inputs, te[0].inputs)


@pytest.mark.parametrize("seg, msg", [(Segment(63, 10, 4), "even"), (Segment(64, 10, 17), "4 \\* n_kv"),
                                      (Segment(64, 0, 4), "positive")])
def test_bad_segments_are_named(seg, msg):
    with pytest.raises(ValueError, match=msg):
        generate(seg)


def test_query_accuracy_on_a_hand_made_batch():
    labels = torch.tensor([[-100, 5, -100, 6, -100, 7],
                           [-100, -100, 9, -100, -100, -100]])
    preds = torch.tensor([[5, 5, 0, 6, 1, 1],     # 2 of 3 queries right; unlabelled positions never count
                          [9, 9, 8, 9, 9, 9]])    # its one query wrong
    acc = query_accuracy(preds, labels)
    assert torch.allclose(acc, torch.tensor([2 / 3, 0.0]))
    assert query_accuracy(labels.clamp_min(0), labels).tolist() == [1.0, 1.0]


def test_evaluate_equals_full_forward_argmax():
    """The gathered-logits evaluation equals zoology's: argmax of the full forward, scored where labels != -100."""
    data = DataConfig(train=(Segment(32, 8, 2),), test=(Segment(32, 6, 2), Segment(64, 5, 8)))
    run = RunConfig(spec="conv,based:feature_dim=4", d_model=16, lr=1e-3)
    model = build(run, data)
    _, test = data.generate("cpu")
    overall, per_seg = evaluate(model, test, run, batch_size=4)
    with torch.no_grad():
        full = [query_accuracy(model(d.inputs).argmax(-1), d.labels) for d in test]
    assert per_seg == pytest.approx({d.segment.name: a.mean().item() for d, a in zip(test, full)})
    assert overall == pytest.approx(torch.cat(full).mean().item())
    logits = query_logits(model, test[0].inputs, test[0].qpos)
    assert logits.shape == (6, 2, V)


def test_state_bytes_seqmix_and_zoology_formulas():
    data = DataConfig(test=(Segment(256, 1, 8),))
    d = 64
    based = build(RunConfig(spec="conv,based:feature_dim=16", d_model=d, lr=1e-3), data, "meta")
    E = 16 * 17 // 2 + 16 + 1
    assert zoology_state_bytes(based, 256) == 4 * (d * 3 + d * E + E)
    assert seqmix_state_bytes(based, 256) == 4 * (2 * d * 3 + d * (1 + 16 + 256) + (1 + 16 + 256))
    swa = build(RunConfig(spec="conv,swa:32", d_model=d, lr=1e-3), data, "meta")
    assert zoology_state_bytes(swa, 256) == 4 * (d * 3 + 2 * 32 * d)
    attn = build(RunConfig(spec="conv,attn", d_model=d, lr=1e-3), data, "meta")
    assert zoology_state_bytes(attn, 256) == 4 * (d * 3 + 2 * d * 256)
    assert seqmix_state_bytes(attn, 256) == attn.state_bytes(1, 256, torch.float32)
    mamba = build(RunConfig(spec="mamba:8*2", d_model=d, lr=1e-3), data, "meta")
    assert zoology_state_bytes(mamba, 256) == 4 * 2 * (2 * d * 8)


def test_best_lr_per_point_and_frontier():
    base = {k: 0 for k in ("spec_canonical", "heads", "epochs", "batch_size", "weight_decay", "early_stop", "seed",
                           "precision", "steps_per_epoch", "data")}
    recs = [dict(base, family="a", d_model=8, lr=1e-3, accuracy=0.5, state_bytes=10),
            dict(base, family="a", d_model=8, lr=1e-2, accuracy=0.7, state_bytes=10),
            dict(base, family="a", d_model=16, lr=1e-3, accuracy=0.6, state_bytes=20)]
    best = best_per_point(recs)
    assert [(r["d_model"], r["lr"]) for r in best] == [(8, 1e-2), (16, 1e-3)]
    assert frontier([(10, 0.7), (20, 0.6), (5, 0.2), (40, 0.9)]) == [(5, 0.2), (10, 0.7), (40, 0.9)]


def test_no_run_starts_after_the_deadline(tmp_path):
    data = DataConfig(train=(Segment(16, 4, 2),), test=(Segment(16, 2, 2),))
    p = plan([("conv,swa:4", 16)], [1e-3, 1e-2], data, epochs=1, steps_per_epoch=1)
    counts = execute(p, tmp_path, devices=["cpu"], max_minutes=0)
    assert counts["done"] == 0 and counts["left"] == 2 and load_results(tmp_path) == []


def _mqar(*args):
    return CliRunner().invoke(main, ["mqar", *args])


def test_mqar_cli_two_runs_results_png_restart_and_plot(tmp_path):
    out = tmp_path / "sweep"
    args = ["--spec", "conv,based:feature_dim=4", "--spec", "conv,swa:8", "--d-model", "16", "--lr", "3e-3",
            "--epochs", "2", "--scale", "0.001", "--steps-per-epoch", "2", "--out", str(out)]
    r = _mqar(*args)
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [x["spec"] for x in recs] == ["conv,based:feature_dim=4", "conv,swa:8"]
    for x in recs:
        assert x["d_model"] == 16 and x["lr"] == 3e-3 and x["epochs_run"] == 2 and len(x["history"]) == 2
        assert 0.0 <= x["accuracy"] <= 1.0 and len(x["accuracy_per_segment"]) == 7
        assert x["state_bytes"] > 0 and x["state_bytes_zoology"] > 0 and x["seconds"] > 0
    assert recs[0]["family"] == "conv+based" and recs[1]["family"] == "conv+swa"
    png = out / "mqar.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "conv,swa:8" in (out / "mqar.md").read_text()
    again = _mqar(*args)
    assert again.exit_code == 0 and "0 runs trained, 2 already" in again.output
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    png.unlink()
    r = _mqar("plot", str(out))
    assert r.exit_code == 0, r.output
    assert png.exists()


@pytest.mark.parametrize("args, msg", [
    ([], "nothing to run"),
    (["--spec", "conv,basd", "--d-model", "16", "--lr", "1e-3"], "Did you mean 'based'"),
    (["--spec", "conv,based", "--lr", "1e-3"], "give both --spec and --d-model"),
    (["--spec", "conv,based:heads=3", "--d-model", "16", "--lr", "1e-3"], "must divide"),
    (["--preset", "figure2", "--epochs", "0"], "--epochs must be positive"),
])
def test_mqar_cli_bad_input_is_one_screen(args, msg, tmp_path):
    r = _mqar(*args, "--out", str(tmp_path))
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output


def test_mqar_plot_without_results(tmp_path):
    r = _mqar("plot", str(tmp_path))
    assert r.exit_code == 2 and "no results" in r.output


def test_worker_processes_record_every_run(tmp_path):
    """Two spawned workers, three runs: a worker told to stop while the other still trains is not an error."""
    data = DataConfig(train=(Segment(16, 4, 2),), test=(Segment(16, 2, 2),))
    p = plan([("conv,swa:4", 16)], [1e-3, 3e-3, 1e-2], data, epochs=1, steps_per_epoch=1)
    counts = execute(p, tmp_path, devices=["cpu"], workers=2)
    assert counts["done"] == 3 and counts["failed"] == 0
    assert sorted(r["lr"] for r in load_results(tmp_path)) == [1e-3, 3e-3, 1e-2]
