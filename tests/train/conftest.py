"""Fixtures for the trainer tests: a small JSONL dataset next to the shared tiny world."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tiny_run_fields

ROWS = [
    ("what colour is the fox?", "the fox is red."),
    ("what does alice have?", "alice has three apples."),
    ("seven plus six?", "seven plus six is thirteen. 7 + 6 = 13."),
    ("sort: pear, apple, fig.", "the sorted list is apple, fig, pear."),
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 prompt/response rows (the 4 above, twice)."""
    path = tmp_path_factory.mktemp("train_data") / "train.jsonl"
    return write_jsonl(path, [{"prompt": p, "response": r} for p, r in ROWS * 2])


@pytest.fixture(scope="session")
def base_overrides(tiny_world: dict, train_data: Path) -> dict[str, Any]:
    """Config fields for a fast CPU run on the tiny world; add output_dir and method."""
    return tiny_run_fields(tiny_world, train_data)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run faster on one thread, and far faster when the CPU is shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
