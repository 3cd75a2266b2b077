"""Shared fixtures: a tiny world of one tokenizer and three frozen Qwen2 models.

Everything is built from a config and a tokenizer trained locally with `tokenizers`, saved with
`save_pretrained`, and loaded back through the same `from_pretrained` path a user's real model
takes. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

_TEXT = [
    "the red fox lives in the north forest and eats berries",
    "alice has three apples and bob has five apples so they have eight apples",
    "question: what colour is the fox? answer: the fox is red.",
    "seven plus six is thirteen. 7 + 6 = 13. twelve minus four is eight.",
    "sort the list: pear, apple, fig. the sorted list is apple, fig, pear.",
    "the blue whale swims in the cold sea and sings at night",
] * 20


def train_tokenizer(out_dir: Path, vocab_size: int = 320):
    """The mini world's tokenizer recipe (BPE + Qwen-like chat template) on a few sentences."""
    from deltakd.data.mini.tokenizer import train_tokenizer as train_mini_tokenizer

    return train_mini_tokenizer(_TEXT, out_dir, vocab_size=vocab_size)


def make_model(out_dir: Path, vocab_size: int, *, hidden: int, layers: int, seed: int) -> Path:
    """A randomly initialised Qwen2 causal LM saved with `save_pretrained`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Paths of a tokenizer and three tiny models sharing it.

    Keys: `tokenizer`, `teacher_ft`, `teacher_raw`, `student_raw` (paths that load with
    `from_pretrained`; each model directory also holds the tokenizer) and `vocab_size`.
    """
    root = tmp_path_factory.mktemp("tiny_world")
    tok = train_tokenizer(root / "tokenizer")
    vocab_size = len(tok)
    world: dict = {"tokenizer": root / "tokenizer", "vocab_size": vocab_size}
    for role, hidden, layers, seed in (
        ("teacher_raw", 64, 2, 1),
        ("teacher_ft", 64, 2, 2),
        ("student_raw", 32, 1, 3),
    ):
        path = make_model(root / role, vocab_size, hidden=hidden, layers=layers, seed=seed)
        tok.save_pretrained(path)
        world[role] = path
    return world


def tiny_run_fields(world: dict, dataset: str | Path) -> dict:
    """Config fields for a fast CPU training run on the tiny world; callers add the method,
    output_dir and whatever their test varies."""
    return {
        "student_raw": str(world["student_raw"]),
        "teacher_ft": str(world["teacher_ft"]),
        "teacher_raw": str(world["teacher_raw"]),
        "tokenizer": str(world["tokenizer"]),
        "dataset": str(dataset),
        "max_length": 64,
        "max_prompt_length": 32,
        "per_device_batch_size": 4,
        "learning_rate": 1e-2,
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "save_steps": 0,
        "progress": False,
        "device": "cpu",
        "resume": "never",
    }
