"""Helpers shared by the evaluation tests: local copies of the recall tasks and a perfect-recall stand-in model."""
from pathlib import Path

import torch

from seqmix.eval import TASKS_DIR

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
RECALL = FIXTURES / "recall.jsonl"
UPSTREAM = {"swde": ("swde", "SWDE"), "fda": ("fda", "FDA"), "squad_completion": ("squad_completion",
                                                                                   "SQUADCompletion")}


def based_task_yaml(directory: Path, task: str, data: Path = RECALL) -> Path:
    """A task YAML that is seqmix's based_<task> with its dataset read from the JSON Lines file `data`."""
    path = Path(directory) / f"local_based_{task}.yaml"
    path.write_text(f"include: {TASKS_DIR / f'based_{task}.yaml'}\ndataset_path: json\ndataset_name: null\n"
                    f"dataset_kwargs:\n  data_files:\n    validation: {data}\n")
    return path


def upstream_task(task: str, data: Path = RECALL):
    """lm-eval's own task class for `task` (swde, fda, squad_completion), its download reading `data` instead."""
    import importlib

    import datasets

    module, cls_name = UPSTREAM[task]
    cls = getattr(importlib.import_module(f"lm_eval.tasks.{module}.task"), cls_name)

    class Local(cls):
        def download(self, *args, **kwargs):
            self.dataset = datasets.load_dataset("json", data_files={"validation": str(data)})

    obj = Local()
    obj.config.task = task  # what lm-eval's task factory sets from the YAML's `task:`
    return obj


def tiny_hybrid(vocab_size: int = 257):
    """A small random HybridLM (the oracle below never runs it: SeqmixLM only needs a model to hold)."""
    from seqmix.config import resolve_model
    from seqmix.model import build_model

    torch.manual_seed(0)
    return build_model(resolve_model("conv,mlp", layers=2, d_model=32, n_heads=2, vocab_size=vocab_size))


def oracle_lm(**kwargs):
    """SeqmixLM whose generation recalls perfectly from the context it is given: the prompt's last line is a key
    ("Year:"); the answer is what followed that key's last earlier occurrence up to the line's end, then a new
    line and more text (which the task's `until` must cut away), or " unknown" if the key is not in the context.
    Everything around it (tokenisation, left truncation, stop strings, the task's metric) is the real code.
    `lm.seen` records each context's token count."""
    from seqmix.eval.lm_eval import SeqmixLM

    class Oracle(SeqmixLM):
        def _model_generate(self, context, max_length, stop, attention_mask=None, **gen):
            rows = []
            for b in range(context.shape[0]):
                ids = context[b][attention_mask[b].bool()].tolist()
                self.seen.append(len(ids))
                text = self.tokenizer.decode(ids)
                key = text[text.rfind("\n") + 1:]
                before = text[: len(text) - len(key)]
                at = before.rfind(key) if key else -1
                answer = before[at + len(key): before.find("\n", at)] if at >= 0 else " unknown"
                rows.append(self.tokenizer.encode(answer + "\nnext: line"))
            width = max(map(len, rows))
            new = torch.tensor([r + [self.eot_token_id] * (width - len(r)) for r in rows])
            return torch.cat([context, new], dim=1)

    lm = Oracle(tiny_hybrid(), tokenizer="bytes", dtype="float32", device="cpu", **kwargs)
    lm.seen = []
    return lm
