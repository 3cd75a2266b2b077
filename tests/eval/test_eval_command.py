"""`deltakd eval` end to end on a tiny model and a JSONL file, and the `evaluate` API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltakd.cli import main
from deltakd.errors import DataError
from deltakd.eval.evaluate import evaluate, extract_final_answer, load_eval_rows, split_row
from deltakd.generation import Generation, GenerationSettings

ROWS = [
    {
        "messages": [
            {"role": "user", "content": "what colour is the fox?"},
            {"role": "assistant", "content": "the fox is red."},
        ]
    },
    {"prompt": "seven plus six?", "response": "seven plus six is thirteen."},
    {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "sort: pear, apple, fig"},
            {"role": "assistant", "content": "apple, fig, pear"},
        ]
    },
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_eval_json_last_line_and_predictions(tiny_chat_model, tmp_path, capsys) -> None:
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "ev"
    rc = main(
        ["eval", "--model", str(tiny_chat_model), "--data", str(data), "--max-new-tokens", "6",
         "--batch-size", "2", "--json", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = json.loads(last)
    assert set(metrics) >= {"rouge1", "rouge2", "rougeL", "exact_match", "n"}
    assert metrics["n"] == 3
    assert metrics["exact_match"] is None  # no answers in the rows
    for k in ("rouge1", "rouge2", "rougeL"):
        assert 0.0 <= metrics[k] <= 1.0
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3
    assert [p["reference"] for p in preds] == [
        "the fox is red.",
        "seven plus six is thirteen.",
        "apple, fig, pear",
    ]
    assert preds[1]["prompt"] == "seven plus six?"
    assert preds[2]["messages"][0] == {"role": "system", "content": "be brief"}
    assert all(isinstance(p["prediction"], str) and "correct" not in p for p in preds)
    # the per-example scores average to the reported means
    assert sum(p["rouge1"] for p in preds) / 3 == pytest.approx(metrics["rouge1"])
    summary = (out / "summary.md").read_text()
    assert "ROUGE-1" in summary and "examples: 3" in summary


def test_eval_math_rows_score_exact_match(loaded_chat_model, tmp_path) -> None:
    model, tok = loaded_chat_model
    rows = [
        {"prompt": "7 + 6?", "response": "7 + 6 = 13. #### 13", "answer": "13"},
        {"prompt": "2 + 2?", "response": "#### 4", "answer": "4"},
    ]
    settings = GenerationSettings(max_new_tokens=6)
    res = evaluate(model, tok, rows, settings=settings, out_dir=tmp_path / "m", progress=False)
    assert res.exact_match is not None and 0.0 <= res.exact_match <= 1.0
    preds = [json.loads(x) for x in (tmp_path / "m" / "predictions.jsonl").read_text().splitlines()]
    assert [p["answer"] for p in preds] == ["13", "4"]
    assert all(isinstance(p["correct"], bool) for p in preds)
    assert res.exact_match == sum(p["correct"] for p in preds) / 2


def test_evaluate_scores_an_oracle_perfectly(loaded_chat_model, monkeypatch) -> None:
    """With generation replaced by the references, every score is exactly 1."""
    import deltakd.eval.evaluate as ev

    model, tok = loaded_chat_model
    rows = [{"prompt": "q", "response": "the answer is 12", "answer": "12"}] * 2
    reply = Generation("the answer is 12", [], "stop")
    monkeypatch.setattr(ev, "generate", lambda *a, **k: [reply] * 2)
    res = evaluate(model, tok, rows, progress=False)
    assert res.metrics() == {
        "rouge1": 1.0,
        "rouge2": 1.0,
        "rougeL": 1.0,
        "exact_match": 1.0,
        "n": 2,
    }


def test_split_row_and_errors() -> None:
    prompt, ref = split_row(ROWS[2])
    assert [m["role"] for m in prompt] == ["system", "user"] and ref == "apple, fig, pear"
    with pytest.raises(DataError, match="assistant"):
        split_row({"messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(DataError, match="prompt"):
        split_row({"text": "x"})


def test_load_eval_rows(tmp_path) -> None:
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert len(load_eval_rows(str(data), limit=2)) == 2
    with pytest.raises(DataError, match="mini:instruct"):
        load_eval_rows("nope:thing")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 1}\nnot json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl.*2.*JSON"):
        load_eval_rows(str(bad))


def test_missing_model_is_a_clean_cli_error(tmp_path, capsys) -> None:
    data = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    rc = main(["eval", "--model", str(tmp_path / "nope"), "--data", str(data)])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so 7 + 6 = 13\n#### 13", "13"),
        ("the result is \\boxed{42}", "42"),
        ("The answer is 1,000.", "1,000"),
        ("first 3 then 5", "5"),
        ("no numbers", None),
    ],
)
def test_extract_final_answer(text: str, answer: str | None) -> None:
    assert extract_final_answer(text) == answer


def test_eval_mini_math_spec_scores_exact_match(tiny_chat_model, tmp_path, capsys) -> None:
    rc = main(
        ["eval", "--model", str(tiny_chat_model), "--data", "mini:math", "--limit", "2",
         "--max-new-tokens", "4", "--json", "--out", str(tmp_path / "mm")]
    )  # fmt: skip
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n"] == 2 and metrics["exact_match"] is not None
    preds = [
        json.loads(x) for x in (tmp_path / "mm" / "predictions.jsonl").read_text().splitlines()
    ]
    assert all(p["answer"].isdigit() and "correct" in p for p in preds)


def test_mini_references_score_perfectly(loaded_chat_model, monkeypatch) -> None:
    """The mini world's own solutions, used as predictions, are all exact matches."""
    import deltakd.eval.evaluate as ev

    model, tok = loaded_chat_model
    rows = ev.load_eval_rows("mini:math", "test", limit=5)
    refs = [r["messages"][-1]["content"] for r in rows]
    monkeypatch.setattr(ev, "generate", lambda *a, **k: [Generation(r, [], "stop") for r in refs])
    res = ev.evaluate(model, tok, rows, extract=ev.extractor_for("mini:math"), progress=False)
    assert res.exact_match == 1.0 and res.rouge1 == pytest.approx(1.0)
    # the generic extractor reads the mini world's "Answer: N" lines too
    assert all(extract_final_answer(x) == r["answer"] for x, r in zip(refs, rows))
