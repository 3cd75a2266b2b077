"""Fixtures for the eval tests, built on the shared `tiny_world` (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_world: dict) -> Path:
    """A directory holding a tiny causal LM and its chat tokenizer (teacher_ft of tiny_world)."""
    return Path(tiny_world["teacher_ft"])


@pytest.fixture(scope="session")
def loaded_chat_model(tiny_chat_model: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (
        AutoModelForCausalLM.from_pretrained(tiny_chat_model),
        AutoTokenizer.from_pretrained(tiny_chat_model),
    )
