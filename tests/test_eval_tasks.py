"""The recall tasks through lm-eval's real task classes on hand-written rows: seqmix's based_* configs and lm-eval's
upstream swde / fda / squad_completion, answered by a perfect-recall stand-in model (tests/evalkit.py)."""
import json

import pytest

import lm_eval

from evalkit import RECALL, based_task_yaml, oracle_lm, upstream_task  # noqa: E402
from seqmix.eval.tasks.recall import contains  # noqa: E402

TASKS = ("swde", "fda", "squad_completion")


def _evaluate(lm, tasks):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_defaults=False)  # YAML files and task objects only: skip indexing lm-eval's 14k
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0)
    return out["results"], {t: sorted(s, key=lambda s: s["doc_id"]) for t, s in out["samples"].items()}


def test_contains_is_a_literal_case_insensitive_substring_match():
    assert contains(" BLUE and green", " blue") == 1
    assert contains("costs $3.50 (approx.)", "$3.50 (approx.)") == 1
    assert contains("costs $3X50 approx", "$3.50 (approx.)") == 0  # "." and "()" are not regex here
    assert contains("a+b", "a+b") == 1 and contains("aab", "a+b") == 0
    assert contains(" 81 mg", " 81 mg ") == 0  # the gold's trailing space counts


@pytest.fixture(scope="module")
def recall(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    lm = oracle_lm(batch_size=3)
    tasks = [str(based_task_yaml(d, t)) for t in TASKS] + [upstream_task(t) for t in TASKS]
    return _evaluate(lm, tasks)


@pytest.mark.parametrize("task", TASKS)
def test_both_variants_score_the_rows_as_the_paper_and_lm_eval_define_them(recall, task):
    results, samples = recall
    rows = [json.loads(line) for line in RECALL.read_text().splitlines()]
    based, upstream = samples[f"based_{task}"], samples[task]
    # the Based variant sends `text` as stored; lm-eval's strips it (row 3 starts with whitespace)
    assert [s["arguments"][0][0] for s in based] == [r["text"] for r in rows]
    assert [s["arguments"][0][0] for s in upstream] == [r["text"].strip() for r in rows]
    for s in based:  # zero-shot, until a newline, at most 48 tokens
        assert s["arguments"][0][1]["until"] == ["\n"] and s["arguments"][0][1]["max_gen_toks"] == 48
    # lm-eval 0.4.13's squad_completion class reads its generation kwargs from a config it never sets, so it gets
    # lm-eval's defaults: until "\n\n", 256 tokens (a difference of the upstream variant, kept as it is)
    until, most = (["\n\n"], 256) if task == "squad_completion" else (["\n"], 48)
    for s in upstream:
        assert s["arguments"][0][1]["until"] == until and s["arguments"][0][1]["max_gen_toks"] == most
    assert rows[3]["text"] != rows[3]["text"].strip()
    # generation is cut at the newline: the oracle's "\nnext: line" never reaches the metric
    assert [s["filtered_resps"][0] for s in based] == [" 1999", " BLUE", " $3.50 (approx.)", " 81 mg"]
    # case-insensitive and literal; the stored trailing space of row 3's gold fails the Based variant only
    assert [s["contains"] for s in based] == [1, 1, 1, 0]
    assert [s["contains"] for s in upstream] == [1, 1, 1, 1]
    assert results[f"based_{task}"]["contains,none"] == pytest.approx(0.75)
    assert results[task]["contains,none"] == pytest.approx(1.0)


def test_left_truncation_keeps_the_last_2000_tokens(tmp_path):
    filler = "".join(f"line {i}: nothing to see here\n" for i in range(120))  # ~3,300 bytes, no key in it
    rows = [{"text": filler + "Code: 4242\n\nCode:", "value": " 4242"},   # the gold near the end survives
            {"text": "Code: 7777\n" + filler + "\nCode:", "value": " 7777"}]  # the gold at the start is cut
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert all(len(r["text"].encode()) > 2000 for r in rows)  # bytes tokenizer: one token per byte
    lm = oracle_lm(batch_size=2)
    _, samples = _evaluate(lm, [str(based_task_yaml(tmp_path, "swde", data))])
    assert [s["contains"] for s in samples["based_swde"]] == [1, 0]
    assert [s["filtered_resps"][0] for s in samples["based_swde"]] == [" 4242", " unknown"]
    assert lm.seen == [2000, 2000]  # max length 2048 - 48 generated tokens
