"""The Based paper's recall metric for based_swde / based_fda / based_squad_completion (referenced by their YAML).

contains = 1 when the gold `value`, taken literally (regex metacharacters escaped) and ignoring case, occurs
anywhere in the generated continuation, else 0; the task averages it.
"""
from __future__ import annotations

import re


def contains(continuation: str, gold: str) -> int:
    """1 if `gold` occurs in `continuation` (case-insensitive, literal), else 0."""
    return int(re.search(re.escape(gold), continuation, re.IGNORECASE) is not None)


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    """lm-eval hook: one generation per document, scored against the document's unstripped `value`."""
    return {"contains": contains(results[0], doc["value"])}
