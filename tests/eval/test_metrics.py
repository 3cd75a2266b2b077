"""ROUGE and exact match against values computed by hand."""

from __future__ import annotations

import math

import pytest

from deltakd.errors import DataError
from deltakd.eval.metrics import (
    exact_match,
    exact_match_per_example,
    mean_std,
    normalize_answer,
    rouge,
    rouge_scores,
)


def test_identical_is_one_and_disjoint_is_zero() -> None:
    got = rouge_scores(
        ["the cat sat on the mat", "alpha beta"], ["the cat sat on the mat", "gamma delta"]
    )
    assert got == pytest.approx({"rouge1": 0.5, "rouge2": 0.5, "rougeL": 0.5})
    per = rouge(["a b c"], ["a b c"]).per_example
    assert per == {"rouge1": [1.0], "rouge2": [1.0], "rougeL": [1.0]}
    assert rouge_scores(["x y z"], ["p q r"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_partial_overlap_matches_hand_computation() -> None:
    # reference: the cat sat on the mat (6 unigrams, 5 bigrams); prediction: the cat is running
    # (4 unigrams, 3 bigrams). Shared unigrams {the, cat} = 2 -> P=2/4, R=2/6, F1=0.4.
    # Shared bigram "the cat" = 1 -> P=1/3, R=1/5, F1=0.25. LCS "the cat" = 2 -> F1=0.4.
    got = rouge_scores(["the cat is running"], ["the cat sat on the mat"])
    assert got["rouge1"] == pytest.approx(0.4)
    assert got["rouge2"] == pytest.approx(0.25)
    assert got["rougeL"] == pytest.approx(0.4)


def test_lcs_differs_from_unigram_when_order_differs() -> None:
    # unigrams all shared (F1=1) but the longest common subsequence is 2 of 3 -> F1=2/3.
    got = rouge_scores(["c a b"], ["a b c"])
    assert got["rouge1"] == pytest.approx(1.0)
    assert got["rougeL"] == pytest.approx(2 / 3)
    assert got["rouge2"] == pytest.approx(0.5)  # "a b" shared of 2 bigrams each


def test_stemming_is_on() -> None:
    assert rouge_scores(["running dogs"], ["run dog"])["rouge1"] == pytest.approx(1.0)


def test_mismatched_lengths_and_empty_inputs() -> None:
    with pytest.raises(DataError, match="one reference per"):
        rouge_scores(["a"], ["a", "b"])
    assert rouge_scores([], []) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def _last_number(text: str) -> str | None:
    import re

    found = re.findall(r"-?\d+", text)
    return found[-1] if found else None


def test_exact_match_with_extraction() -> None:
    preds = ["so the answer is 42", "I think 7 then 9", "no idea", "1,000."]
    golds = ["42", "7", "3", "1000"]
    per = exact_match_per_example(preds, golds, _last_number)
    assert per == [True, False, False, False]  # _last_number drops "1,000" to "000"
    assert exact_match(preds, golds, _last_number) == pytest.approx(0.25)
    # without an extractor the whole text is normalised and compared
    assert exact_match(["1,000.", " 42 ", "Paris"], ["1000", "42.0", "paris"]) == 1.0


def test_exact_match_needs_gold_answers() -> None:
    with pytest.raises(DataError, match="answer"):
        exact_match(["1"], [None])


def test_normalize_answer() -> None:
    assert normalize_answer("$1,234.") == "1234"
    assert normalize_answer("-3.50") == "-3.5"
    assert normalize_answer("  Hello   World ") == "hello world"
    assert normalize_answer(None) is None


def test_mean_std_sample_std() -> None:
    m, s = mean_std([1.0, 2.0, 3.0])
    assert m == pytest.approx(2.0) and s == pytest.approx(1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    assert all(math.isnan(x) for x in mean_std([]))


def test_math_exact_match_reads_nested_boxed_answers() -> None:
    """`\\boxed{\\frac{1}{2}}` is one half (the old regex read it as `2`), equal to `0.5` and
    to `\\frac{2}{4}`, and never to `2` or `\\frac{4}{3}`."""
    from deltakd.eval.metrics import math_equal

    reply = "Adding the cases gives 2 favourable of 4, so the answer is $\\boxed{\\frac{1}{2}}$."
    assert math_equal(reply, "\\frac{1}{2}")
    assert math_equal(reply, "0.5") and math_equal(reply, "\\frac{2}{4}")
    assert not math_equal(reply, "2")
    cot = "<think>\nlong reasoning 7 then 9\n</think>\nThus $\\boxed{\\frac{3}{4}}$."
    assert math_equal(cot, "\\frac{3}{4}") and not math_equal(cot, "\\frac{4}{3}")
    assert math_equal("the answer is 17", "17") and math_equal("#### 1,000", "1000")
    per = exact_match_per_example([reply, cot], ["\\frac{1}{2}", "9"], verify=math_equal)
    assert per == [True, False]
    assert exact_match([reply, cot], ["0.5", "0.75"], verify=math_equal) == 1.0


def test_evaluate_scores_math_replies_with_math_verify() -> None:
    """The eval path's default exact match (no dataset extractor) is math-verify's."""
    from deltakd.eval.evaluate import extractor_for

    assert extractor_for("openmath:nvidia/OpenMathReasoning") is None
    assert extractor_for("mini:math") is not None


def test_math_equal_works_off_the_main_thread() -> None:
    """math-verify's timeout needs SIGALRM (main thread only): elsewhere it is switched off."""
    from concurrent.futures import ThreadPoolExecutor

    from deltakd.eval.metrics import math_equal

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(math_equal, "so $\\boxed{\\frac{3}{4}}$", "0.75").result()
