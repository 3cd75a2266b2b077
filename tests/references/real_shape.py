"""Qwen2.5-shaped miniatures for the teacher-server tests: the real vocabulary rows, tiny rest.

Qwen2.5-7B's lm_head has 152,064 rows, Qwen2.5-1.5B's 151,936, their tokenizer 151,665
tokens. These models keep exactly those rows (and a 151,665-token tokenizer with a chat
template) but shrink everything else — 1 layer, hidden 64 / 32 instead of 3,584 / 1,536 — so
a test builds and runs them in seconds on a shared CPU machine (the 7B shape with 1 layer is
~1.3 B parameters).
"""

from __future__ import annotations

import json
from pathlib import Path

TOKENIZER_SIZE = 151_665
TEACHER_ROWS = 152_064  # Qwen2.5-7B
STUDENT_ROWS = 151_936  # Qwen2.5-1.5B

_TEXT = [
    "what is 12 plus 30? it is 42.",
    "the quick brown fox jumps over the lazy dog.",
    "teachers and students share one tokenizer.",
] * 4


def build_tokenizer(out_dir: Path) -> int:
    """A byte-level BPE with the mini world's chat template, padded with never-produced entries
    to Qwen2.5's 151,665 tokens. Returns its size."""
    from transformers import PreTrainedTokenizerFast

    from deltakd.data.mini.tokenizer import train_tokenizer

    small = out_dir / "small"
    train_tokenizer(_TEXT, small, vocab_size=300)
    spec = json.loads((small / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    assert all(t["id"] < len(vocab) for t in spec.get("added_tokens", []))
    for i in range(len(vocab), TOKENIZER_SIZE):
        vocab[f"<|unused_{i}|>"] = i
    (small / "tokenizer.json").write_text(json.dumps(spec))
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(small / "tokenizer.json"),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=512,
    )
    from deltakd.data.mini.tokenizer import CHAT_TEMPLATE

    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    assert len(tok) == TOKENIZER_SIZE, len(tok)
    return len(tok)


def build_model(out_dir: Path, rows: int, *, hidden: int, seed: int, layers: int = 1) -> Path:
    """A random Qwen2 causal LM with `rows` embedding / lm_head rows, saved with the tokenizer
    that `build_tokenizer` wrote next to it (`out_dir.parent / "tokenizer"`)."""
    import shutil

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=rows,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(config).save_pretrained(out_dir)
    tok_dir = out_dir.parent / "tokenizer"
    for f in tok_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out_dir / f.name)
    return out_dir


ROLES = ("teacher_ft", "teacher_raw", "student_raw")


def build_world(root: Path, roles: tuple[str, ...] = ROLES) -> dict:
    """tokenizer + teacher_ft / teacher_raw (152,064 rows) + student_raw (151,936 rows)."""
    world: dict = {"tokenizer": root / "tokenizer"}
    world["vocab_size"] = build_tokenizer(root / "tokenizer")
    for role, rows, hidden, seed in (
        ("teacher_ft", TEACHER_ROWS, 64, 1),
        ("teacher_raw", TEACHER_ROWS, 64, 2),
        ("student_raw", STUDENT_ROWS, 32, 3),
    ):
        if role in roles:
            world[role] = build_model(root / role, rows, hidden=hidden, seed=seed)
    return world


if (
    __name__ == "__main__"
):  # build one for a torchrun test: python -m tests.references.real_shape DIR
    import sys

    print(json.dumps({k: str(v) for k, v in build_world(Path(sys.argv[1])).items()}))
