"""The miniature world: a seeded knowledge base, two chat tasks, a pretraining corpus, a BPE
tokenizer and four tiny Qwen2 models (teacher_raw, teacher_ft, student_raw, and teacher_ft2: a
second finetune of teacher_raw with another seed, for the `multi_teacher` variant), so that
Delta-KD runs end to end offline on a CPU.

Public API::

    MINI_TASKS                                   # ("instruct", "math")
    load_task(task, split, *, seed=0, limit=None) -> list[dict]
    extract_answer(text) -> str | None
    mini_world_dir() -> Path                     # the shipped, built world
    build_world(out_dir, *, seed=0, scale="full") -> Path
    deltakd.data.mini.build.build_role(world_dir, "teacher_ft2") -> Path   # one teacher alone
"""

from __future__ import annotations

from pathlib import Path

from deltakd.data.mini.tasks import MINI_TASKS, SPLITS, extract_answer, load_task

__all__ = ["MINI_TASKS", "SPLITS", "build_world", "extract_answer", "load_task", "mini_world_dir"]


def mini_world_dir() -> Path:
    """Directory of the shipped world: tokenizer/, teacher_raw/, teacher_ft/, teacher_ft2/,
    student_raw/ and world.json. Each model directory loads with ``from_pretrained``."""
    from deltakd.errors import DataError

    path = Path(__file__).resolve().parent.parent.parent / "assets" / "mini"
    if not (path / "world.json").is_file():
        raise DataError(
            f"the shipped mini world is missing at {path}; rebuild it with "
            f"`deltakd mini build --out {path}` or reinstall deltakd"
        )
    return path


def build_world(out_dir: str | Path, *, seed: int = 0, scale: str = "full") -> Path:
    """Regenerate the whole world (corpus, tokenizer, four models, world.json) into out_dir."""
    from deltakd.data.mini.build import build_world as _build

    return _build(out_dir, seed=seed, scale=scale)
