"""Mixture specs `A+B`: rows of every part, interleaved so any prefix holds every part."""

from __future__ import annotations

import pytest

from deltakd.data.specs import load_rows, parse_spec
from deltakd.errors import DataError


def _rows(path, texts):
    import json

    path.write_text(
        "".join(json.dumps({"prompt": t, "response": t.upper()}) + "\n" for t in texts),
        encoding="utf-8",
    )
    return str(path)


def test_mixture_interleaves_all_rows_of_every_part(tmp_path):
    a = _rows(tmp_path / "a.jsonl", ["a1", "a2", "a3"])
    b = _rows(tmp_path / "b.jsonl", ["b1"])
    rows = load_rows(f"{a}+{b}", "train")
    prompts = [r["messages"][0]["content"] for r in rows]
    assert prompts == ["a1", "b1", "a2", "a3"]
    assert [r["messages"][0]["content"] for r in load_rows(f"{a}+{b}", "train", limit=2)] == [
        "a1",
        "b1",
    ]


def test_mini_mixture_default_splits_and_parts():
    spec = parse_spec("mini:instruct+mini:math")
    assert spec.kind == "mix" and [p.text for p in spec.parts] == ["mini:instruct", "mini:math"]
    assert spec.default_train_split == "train" and spec.default_eval_split == "test"
    rows = load_rows("mini:instruct+mini:math", limit=4)
    assert [r["answer"] is None for r in rows] == [True, False, True, False]


@pytest.mark.parametrize("bad", ["mini:instruct+", "+mini:math", "mini:instruct+mini:nope"])
def test_bad_mixture_is_refused_with_the_fix(bad):
    with pytest.raises(DataError, match="mini:"):
        parse_spec(bad)
