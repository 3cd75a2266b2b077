"""Scores for generated text: ROUGE-1/2/L F1 (through `rouge-score`) and exact match.

Exact match of math replies goes through `math-verify` (`math_equal`): it finds the reply's
final answer (`\\boxed{...}` first, nested braces included, else the last expression) and
compares it with the gold answer symbolically, so `\\boxed{\\frac{1}{2}}` equals `0.5` and
never `2`.

ROUGE follows the paper's protocol: F1 of unigram / bigram / longest-common-subsequence
overlap, Porter stemming on, `rouge-score`'s own tokenizer (lower-cases and splits on
non-alphanumerics). Scores are fractions in [0, 1]; multiply by 100 for the paper's tables.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from deltakd.errors import DataError

ROUGE_KEYS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")


@dataclass
class RougeResult:
    """Means over examples plus the per-example F1 lists (same order as the inputs)."""

    rouge1: float
    rouge2: float
    rougeL: float  # the spelling every ROUGE table uses
    per_example: dict[str, list[float]] = field(default_factory=dict)

    def means(self) -> dict[str, float]:
        return {"rouge1": self.rouge1, "rouge2": self.rouge2, "rougeL": self.rougeL}


def _check_lengths(a: Sequence[object], b: Sequence[object], what: str) -> None:
    if len(a) != len(b):
        raise DataError(
            f"{what}: {len(a)} predictions but {len(b)} references; pass one reference per "
            "prediction, in the same order."
        )


def rouge_per_example(
    predictions: Sequence[str], references: Sequence[str]
) -> dict[str, list[float]]:
    """ROUGE-1/2/L F1 for each (prediction, reference) pair, keyed by `ROUGE_KEYS`."""
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references, "rouge")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    out: dict[str, list[float]] = {k: [] for k in ROUGE_KEYS}
    for pred, ref in zip(predictions, references):
        # rouge-score's argument order is (target, prediction); F1 is symmetric but P/R are not.
        scores = scorer.score(ref, pred)
        for k in ROUGE_KEYS:
            out[k].append(float(scores[k].fmeasure))
    return out


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over examples: `{"rouge1", "rouge2", "rougeL"}` in [0, 1].

    An empty input gives 0.0 for every key (nothing was matched), not NaN.
    """
    per = rouge_per_example(predictions, references)
    n = len(predictions)
    return {k: (sum(v) / n if n else 0.0) for k, v in per.items()}


def rouge(predictions: Sequence[str], references: Sequence[str]) -> RougeResult:
    """Like `rouge_scores`, keeping the per-example scores."""
    per = rouge_per_example(predictions, references)
    n = len(predictions)
    means = {k: (sum(v) / n if n else 0.0) for k, v in per.items()}
    return RougeResult(per_example=per, **means)


_NUMBER = re.compile(r"^[-+]?\d[\d,]*(\.\d+)?$|^[-+]?\.\d+$")


def normalize_answer(text: str | None) -> str | None:
    """Canonical form used to compare final answers.

    Strips whitespace, a trailing period and `$`; numbers compare by value (so "1,000",
    "1000" and "1000.0" agree); everything else compares case-insensitively.
    """
    if text is None:
        return None
    s = text.strip().rstrip(".").strip().strip("$").strip()
    if _NUMBER.match(s):
        try:
            value = float(s.replace(",", ""))
        except ValueError:
            return s.lower()
        if math.isfinite(value) and value == int(value):
            return str(int(value))
        return repr(value)
    return " ".join(s.lower().split())


def _math_verify() -> tuple[Any, Any]:
    try:
        from math_verify import parse, verify
    except ImportError as exc:  # a declared dependency: only a broken install gets here
        raise DataError(
            f"exact match of math answers needs the `math-verify` package ({exc}); "
            "`pip install 'math-verify>=0.7,<0.10'` (or reinstall deltakd)."
        ) from exc
    return parse, verify


def math_equal(prediction: str, gold: str) -> bool:
    """Whether a math reply's final answer equals `gold`, by `math-verify`.

    The reply's answer is its last `\\boxed{...}` (nested braces kept), else its last
    expression; `gold` is a bare answer (`\\frac{3}{4}`, `17`) or LaTeX. A gold answer that
    equals the whole reply after `normalize_answer` also matches (free-text answers).
    """
    if normalize_answer(prediction) == normalize_answer(gold):
        return True
    parse, verify = _math_verify()
    # math-verify bounds a pathological sympy comparison with SIGALRM (5 s), which only the
    # main thread can use; elsewhere the timeout is off.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    wrapped = gold if ("$" in gold or "\\boxed" in gold) else f"${gold}$"
    gold_parsed = parse(wrapped, parsing_timeout=timeout)
    pred_parsed = parse(prediction, parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def exact_match_per_example(
    predictions: Sequence[str],
    answers: Sequence[str | None],
    extract: Callable[[str], str | None] | None = None,
    *,
    verify: Callable[[str, str], bool] | None = None,
) -> list[bool]:
    """Whether each prediction's final answer equals the gold answer.

    `verify(prediction, gold)` judges the whole reply (e.g. `math_equal`); otherwise
    `extract` pulls the final answer out of a generated text (e.g. the mini world's
    `extract_answer`) and `None` compares the whole prediction, both after
    `normalize_answer`. A prediction whose extraction finds nothing is wrong; a gold answer
    of `None` is a data error.
    """
    _check_lengths(predictions, answers, "exact_match")
    out: list[bool] = []
    for i, (pred, gold) in enumerate(zip(predictions, answers)):
        if gold is None:
            raise DataError(
                f"exact_match: example {i} has no gold answer; exact match needs an `answer` "
                "field on every row (use ROUGE alone for free-text data)."
            )
        if verify is not None:
            out.append(bool(verify(pred, gold)))
            continue
        got = extract(pred) if extract is not None else pred
        out.append(got is not None and normalize_answer(got) == normalize_answer(gold))
    return out


def exact_match(
    predictions: Sequence[str],
    answers: Sequence[str | None],
    extract: Callable[[str], str | None] | None = None,
    *,
    verify: Callable[[str, str], bool] | None = None,
) -> float:
    """Fraction in [0, 1] of predictions whose final answer equals the gold answer."""
    hits = exact_match_per_example(predictions, answers, extract, verify=verify)
    return sum(hits) / len(hits) if hits else 0.0


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var)
