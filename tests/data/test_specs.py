"""Dataset specs and row validation: every bad row is refused with its number and reason."""

from __future__ import annotations

import json
import re

import pytest

from deltakd.data import load_rows, parse_spec
from deltakd.errors import DataError


def _jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_parse_spec_kinds():
    assert parse_spec("mini:math").kind == "mini"
    assert parse_spec("data/{split}.jsonl").kind == "jsonl"
    spec = parse_spec("ultrachat:HuggingFaceH4/ultrachat_200k")
    assert (spec.kind, spec.target, spec.default_train_split) == (
        "ultrachat", "HuggingFaceH4/ultrachat_200k", "train_sft")  # fmt: skip
    assert parse_spec("openmath:nvidia/OpenMathReasoning").default_train_split == "cot"
    for bad, why in (("mini:poetry", "unknown mini task"), ("data.txt", "not recognised"),
                     ("ultrachat:", "names no dataset")):  # fmt: skip
        with pytest.raises(DataError, match=why):
            parse_spec(bad)


def test_jsonl_prompt_response_and_messages(tmp_path):
    path = _jsonl(tmp_path, [
        {"prompt": "p", "response": "r", "answer": 4, "system": "be brief"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ])  # fmt: skip
    rows = load_rows(str(path))
    assert rows[0] == {"messages": [{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "p"},
                                    {"role": "assistant", "content": "r"}], "answer": "4",
                       "origin": f"{path} row 1"}  # fmt: skip
    assert rows[1]["answer"] is None and rows[1]["messages"][1]["role"] == "assistant"
    assert load_rows(str(path), limit=1) == rows[:1]  # a JSONL file keeps its first rows


def test_split_placeholder(tmp_path):
    _jsonl(tmp_path, [{"prompt": "x", "response": "y"}], name="test.jsonl")
    assert len(load_rows(str(tmp_path / "{split}.jsonl"), "test")) == 1
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "{split}.jsonl"), "train")


OK = {"prompt": "p", "response": "r"}


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("{not json", "line 3 is not valid JSON"),
        ([1, 2], "row 3 is a list"),
        ({"text": "hi"}, "row 3 has neither 'messages' nor 'prompt'+'response'"),
        ({"prompt": "p", "response": 3}, "row 3 has a non-string 'response'"),
        ({"prompt": "p", "response": "  "}, "row 3 has an empty 'response'"),
        (
            {"messages": [{"role": "user", "content": "only a question"}]},
            "row 3 has no assistant turn",
        ),
        ({"messages": [{"role": "bot", "content": "x"}]}, "row 3 message 0 has role 'bot'"),
        ({"messages": [{"role": "user"}]}, "row 3 message 0 lacks 'role' or 'content'"),
        ({"messages": []}, "row 3 has an empty or non-list 'messages'"),
    ],
)
def test_malformed_rows_are_refused_with_row_number(tmp_path, bad, reason):
    path = _jsonl(tmp_path, [OK, OK, bad, OK])
    with pytest.raises(DataError, match=re.escape(reason)) as err:
        load_rows(str(path))
    assert str(path) in str(err.value)


def test_non_utf8_and_empty_files(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(
        json.dumps(OK).encode()
        + b"\n"
        + '{"prompt": "caf\xe9", "response": "r"}\n'.encode("latin-1")
    )
    with pytest.raises(DataError, match=r"line 2 is not UTF-8.*re-encode"):
        load_rows(str(path))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        load_rows(str(empty))


def test_mini_rows():
    rows = load_rows("mini:math", "validation", limit=3)
    assert len(rows) == 3 and rows[0]["answer"] is not None
    assert rows[0]["messages"][-1]["role"] == "assistant"


def test_hf_kinds_from_local_files(tmp_path):
    uc = _jsonl(tmp_path, [{"prompt_id": "1", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}],
        name="uc.jsonl")  # fmt: skip
    assert load_rows(f"ultrachat:{uc}")[0]["messages"][1]["content"] == "hello"
    om = _jsonl(tmp_path, [{"problem": "1+1?", "generated_solution": "2", "expected_answer": "2"},
                           {"problem": "x"}], name="om.jsonl")  # fmt: skip
    with pytest.raises(DataError, match="row 2 lacks 'problem' or 'generated_solution'"):
        load_rows(f"openmath:{om}")
    import datasets

    ds = datasets.Dataset.from_list([{"problem": "1+1?", "generated_solution": "2",
                                      "expected_answer": "2"}])  # fmt: skip
    datasets.DatasetDict({"cot": ds}).save_to_disk(str(tmp_path / "om_ds"))
    rows = load_rows(f"openmath:{tmp_path / 'om_ds'}")
    assert rows == [{"messages": [{"role": "user", "content": "1+1?"},
                                  {"role": "assistant", "content": "2"}], "answer": "2",
                     "origin": f"openmath:{tmp_path / 'om_ds'} split 'cot' row 1"}]  # fmt: skip
    with pytest.raises(DataError, match="no split 'train'"):
        load_rows(f"openmath:{tmp_path / 'om_ds'}", "train")


def test_only_the_asked_split_is_prepared(tmp_path, monkeypatch):
    """A Hub-style repo (README maps splits to parquet files) prepares just the split asked
    for; `load_dataset(repo, split=...)` alone converts every split first (for
    OpenMathReasoning, its whole ~50 GB download)."""
    import datasets

    from deltakd.rehearse.world import OPENMATH, Text, _openmath_rows, write_dataset

    text = Text(0)
    splits = {s: _openmath_rows(text, 2, s) for s in ("cot", "tir", "genselect")}
    snap = write_dataset(tmp_path / "world", OPENMATH, splits)
    cache = tmp_path / "hf_datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    rows = load_rows(f"openmath:{snap}", "tir")
    assert len(rows) == 2 and rows[0]["answer"] and "split 'tir' row 1" in rows[0]["origin"]
    prepared = sorted(p.name.rsplit("-", 1)[-1] for p in cache.rglob("*.arrow"))
    assert prepared == ["tir.arrow"]
    with pytest.raises(DataError, match=r"no split 'train'.*cot, tir, genselect"):
        load_rows(f"openmath:{snap}", "train")
