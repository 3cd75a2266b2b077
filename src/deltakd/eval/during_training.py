"""Scores for evaluation during training (`eval_generate_samples`).

The trainer (`deltakd.train.notebook`) names `generation_scores` as a string: train/ never
imports eval/ (docs/ARCHITECTURE.md §3), so the metrics stay here with the others.
"""

from __future__ import annotations

from collections.abc import Sequence

from deltakd.eval.evaluate import extractor_for
from deltakd.eval.metrics import exact_match, rouge_scores


def generation_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    answers: Sequence[str | None],
    spec: str | None = None,
) -> dict[str, float]:
    """`rouge1`, `rougeL` against the reference replies, and `exact_match` (with the answer
    extractor of `spec`'s dataset) when every row has an `answer`."""
    scores = rouge_scores(predictions, references)
    out = {"rouge1": scores["rouge1"], "rougeL": scores["rougeL"]}
    if answers and all(a is not None for a in answers):
        out["exact_match"] = exact_match(predictions, answers, extractor_for(spec))
    return out
