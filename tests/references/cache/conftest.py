"""Fixtures for the cache tests: a small JSONL training set and a config on the tiny world."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

ROWS = [
    ("what colour is the fox?", "the fox is red."),
    ("what does alice have?", "alice has three apples and bob has five apples."),
    ("seven plus six?", "seven plus six is thirteen. 7 + 6 = 13."),
    ("sort: pear, apple, fig.", "the sorted list is apple, fig, pear."),
    ("where does the fox live?", "the red fox lives in the north forest."),
    ("what sings at night?", "the blue whale sings at night."),
    ("twelve minus four?", "twelve minus four is eight."),
    ("what does the fox eat?", "it eats berries."),
    ("what colour is the whale?", "the whale is blue."),
    ("how many apples?", "they have eight apples."),
]


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows),
                    encoding="utf-8")  # fmt: skip
    return path


@pytest.fixture(scope="session")
def cache_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 distinct rows plus one duplicate (deduplicated by the cache)."""
    return write_jsonl(tmp_path_factory.mktemp("cache_data") / "train.jsonl", [*ROWS, ROWS[0]])


@pytest.fixture(scope="session")
def cache_overrides(tiny_world: dict, cache_data: Path) -> dict[str, Any]:
    """Config fields of a delta_kd run on the tiny world; add output_dir and cache.dir."""
    return {
        "method": "delta_kd",
        "alpha": 0.7,
        "temperature": 1.5,
        "student_raw": str(tiny_world["student_raw"]),
        "teacher_ft": str(tiny_world["teacher_ft"]),
        "teacher_raw": str(tiny_world["teacher_raw"]),
        "tokenizer": str(tiny_world["tokenizer"]),
        "dataset": str(cache_data),
        "max_length": 64,
        "max_prompt_length": 32,
        "per_device_batch_size": 3,
        "progress": False,
        "device": "cpu",
        "shuffle": False,
    }


def make_config(overrides: dict[str, Any], out: Path, **extra: Any) -> Any:
    from deltakd.train.config import load_config

    cache = {"dir": str(out / "cache"), "k": 8, "rows_per_shard": 4, **extra.pop("cache", {})}
    return load_config(None, {**overrides, "output_dir": str(out), "cache": cache, **extra})


@pytest.fixture(scope="session")
def built_cache(cache_overrides: dict[str, Any], tmp_path_factory: pytest.TempPathFactory):
    """(config, BuildResult) of a k=8 fp32 cache in 3 shards, built once for the session."""
    from deltakd.references.cache.build import build_cache

    out = tmp_path_factory.mktemp("built_cache")
    config = make_config(cache_overrides, out, cache={"value_dtype": "fp32"})
    return config, build_cache(config, progress=False)
