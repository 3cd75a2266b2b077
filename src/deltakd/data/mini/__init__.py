"""The miniature worlds: a seeded knowledge base, two chat tasks, a pretraining corpus, a BPE
tokenizer and four tiny Qwen2 models (teacher_raw, teacher_ft, student_raw, and teacher_ft2: a
second finetune of teacher_raw with another seed, for the `multi_teacher` variant), so that
Delta-KD runs end to end offline on a CPU.

Two worlds are shipped: v1 (`assets/mini`, model specs ``mini:<role>``) and v2
(`assets/mini_v2`, ``mini2:<role>``), whose base models already know the tasks, whose teacher
SFT is a local shift and which adds ``student_raw_2x``. Both use the same tasks and tokenizer.

Public API::

    MINI_TASKS                                   # ("instruct", "math")
    load_task(task, split, *, seed=0, limit=None) -> list[dict]
    extract_answer(text) -> str | None
    mini_world_dir(world="v1") -> Path           # a shipped, built world
    model_spec_dir(spec) -> Path | None          # "mini2:teacher_ft" -> its directory
    build_world(out_dir, *, seed=0, scale="full", world="v1") -> Path
    deltakd.data.mini.build.build_role(world_dir, "teacher_ft2") -> Path   # one teacher alone
"""

from __future__ import annotations

from pathlib import Path

from deltakd.data.mini.tasks import MINI_TASKS, SPLITS, extract_answer, load_task

__all__ = [
    "MINI_TASKS",
    "SPLITS",
    "WORLD_SPECS",
    "build_world",
    "extract_answer",
    "load_task",
    "mini_world_dir",
    "model_spec_dir",
]

#: Model-spec prefix -> (world, its folder under deltakd/assets).
WORLD_SPECS: dict[str, tuple[str, str]] = {"mini": ("v1", "mini"), "mini2": ("v2", "mini_v2")}


def mini_world_dir(world: str = "v1") -> Path:
    """Directory of a shipped world: tokenizer/, teacher_raw/, teacher_ft/, teacher_ft2/,
    student_raw/ (v2: also student_raw_2x/) and world.json. Each model directory loads with
    ``from_pretrained``."""
    from deltakd.errors import ConfigError, DataError

    folders = dict(WORLD_SPECS.values())
    if world not in folders:
        raise ConfigError(f"unknown mini world {world!r}; use one of {', '.join(folders)}")
    path = Path(__file__).resolve().parent.parent.parent / "assets" / folders[world]
    if not (path / "world.json").is_file():
        raise DataError(
            f"the shipped mini world {world} is missing at {path}; rebuild it with "
            f"`deltakd mini build --world {world} --out {path}` or reinstall deltakd"
        )
    return path


def model_spec_dir(spec: str) -> Path | None:
    """``mini:<role>`` / ``mini2:<role>`` -> that role's directory in the shipped world v1 / v2
    (a clear ConfigError if the world has no such role); None for any other spec."""
    from deltakd.errors import ConfigError

    prefix, sep, name = spec.partition(":")
    if not sep or prefix not in WORLD_SPECS:
        return None
    world = WORLD_SPECS[prefix][0]
    root = mini_world_dir(world)
    resolved = root / name
    if not name or "/" in name or not resolved.is_dir():
        roles = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise ConfigError(
            f"model path {spec!r}: the mini world {world} has no {name!r}; use "
            f"{', '.join(f'{prefix}:{r}' for r in roles)}."
        )
    return resolved


def build_world(
    out_dir: str | Path, *, seed: int = 0, scale: str = "full", world: str = "v1"
) -> Path:
    """Regenerate a whole world (corpus, tokenizer, models, world.json) into out_dir."""
    from deltakd.data.mini.build import build_world as _build

    return _build(out_dir, seed=seed, scale=scale, world=world)
