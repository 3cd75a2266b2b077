"""The mini world's tasks: determinism, disjoint splits, correct math, answer extraction."""

from __future__ import annotations

import re

import pytest

from deltakd.data.mini import MINI_TASKS, extract_answer, load_task
from deltakd.data.mini.world import make_world
from deltakd.errors import DataError


@pytest.mark.parametrize("task", MINI_TASKS)
def test_same_seed_same_rows_different_seed_different_rows(task: str) -> None:
    a = load_task(task, "train", seed=0, limit=50)
    b = load_task(task, "train", seed=0, limit=50)
    c = load_task(task, "train", seed=1, limit=50)
    assert a == b
    assert a != c
    assert make_world(0) != make_world(1)


def test_rows_have_the_documented_shape() -> None:
    for task in MINI_TASKS:
        for row in load_task(task, "validation", limit=20):
            assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
            assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])
            if task == "math":
                assert re.fullmatch(r"-?\d+", row["answer"])
            else:
                assert row["answer"] is None


def test_returned_rows_are_copies() -> None:
    rows = load_task("instruct", "test", limit=1)
    rows[0]["messages"][0]["content"] = "changed"
    assert load_task("instruct", "test", limit=1)[0]["messages"][0]["content"] != "changed"


@pytest.mark.parametrize("task", MINI_TASKS)
def test_splits_are_disjoint_and_sized(task: str) -> None:
    prompts = {}
    for split in ("train", "validation", "test"):
        rows = load_task(task, split)
        assert len(rows) >= 200
        prompts[split] = {r["messages"][0]["content"] for r in rows}
        assert len(prompts[split]) == len(rows)  # no duplicates inside a split either
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]


def _recompute(problem: str) -> int:
    """The answer worked out from the problem text alone, one pattern per problem type."""
    n = [int(x) for x in re.findall(r"\d+", problem)]
    if " buys " in problem and "gives" in problem:
        a, b, c = n
        return a + b - c
    if "fills" in problem:
        a, b, c = n
        return a * b + c
    if "change" in problem:
        price, count, paid = n
        return paid - price * count
    if "shares them equally" in problem:
        a, b, c = n
        assert a % b == 0
        return a // b - c
    if "legs" in problem:
        a, la, b, lb = n
        return a * la + b * lb
    if "ages add up" in problem:
        x, y, k = n
        return x + y + 2 * k
    raise AssertionError(f"unknown problem type: {problem}")


def test_math_answers_are_correct_and_extractable() -> None:
    world = make_world(0)
    ages = {p.name: p.age for p in world.people}
    legs = {a.name: a.legs for a in world.animals}
    for split in ("train", "test"):
        for row in load_task("math", split, limit=400):
            problem, solution = (m["content"] for m in row["messages"])
            assert int(row["answer"]) == _recompute(problem)
            assert extract_answer(solution) == row["answer"]
            assert solution.rstrip().splitlines()[-1] == f"Answer: {row['answer']}"
            # every intermediate step is correct arithmetic
            for a, op, b, c in re.findall(r"(\d+) ([-+×÷]) (\d+) = (\d+)", solution):
                a, b, c = int(a), int(b), int(c)
                assert {"+": a + b, "-": a - b, "×": a * b, "÷": a // b}[op] == c
            # facts quoted in problems agree with the knowledge base
            for name, age in re.findall(r"([A-Z][a-z]+) is (\d+) years old", problem):
                assert ages[name] == int(age)
            for name, n_legs in re.findall(r"([a-z]+)s with (\d+) legs", problem):
                assert legs[name] == int(n_legs)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("step\nAnswer: 42", "42"),
        ("Answer: 7\nno wait\nAnswer: 9", "9"),
        ("Answer:  042", "42"),
        ("Answer: 1,234", "1234"),
        ("Answer: -3", "-3"),
        ("The result is 42.", None),
        ("", None),
        ("Answer: none", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_instruct_answers_agree_with_the_knowledge_base() -> None:
    world = make_world(0)
    for row in load_task("instruct", "train"):
        q, a = (m["content"] for m in row["messages"])
        m = re.fullmatch(r"How old is ([A-Z][a-z]+)\?", q)
        if m:
            assert a == f"{m.group(1)} is {world.person(m.group(1)).age} years old."
        m = re.fullmatch(r"Sort these words alphabetically: (.*)\.", q)
        if m:
            words = m.group(1).split(", ")
            assert a == f"In alphabetical order: {', '.join(sorted(words, key=str.lower))}."


def test_bad_task_split_and_limit_are_refused_with_a_fix() -> None:
    with pytest.raises(DataError, match="use one of instruct, math"):
        load_task("chat", "train")
    with pytest.raises(DataError, match="use one of train, validation, test"):
        load_task("math", "dev")
    with pytest.raises(DataError, match="non-negative"):
        load_task("math", "test", limit=-1)
    assert len(load_task("math", "test", limit=5)) == 5
