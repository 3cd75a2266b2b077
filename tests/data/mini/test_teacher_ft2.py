"""teacher_ft2, the second finetuned teacher: `multi_teacher` trains with it on the tiny world,
refuses to run without it, and the shipped world and the demo's run config provide it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from deltakd.errors import ConfigError
from deltakd.train import load_config, train
from tests.conftest import make_model, tiny_run_fields

ROWS = [
    ("what colour is the fox?", "the fox is red."),
    ("seven plus six?", "seven plus six is thirteen. 7 + 6 = 13."),
]


@pytest.fixture(scope="module")
def fields(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny-world run fields with a dataset of 4 rows; one torch thread for the module."""
    import torch

    path = tmp_path_factory.mktemp("ft2_data") / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in ROWS * 2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {
        **tiny_run_fields(tiny_world, path),
        "method": "parallelogram",
        "alpha": 1.0,
        "lam": 0.0,
        "max_steps": 2,
        "shuffle": False,
        "limit": 4,
    }
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def other_teacher(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second teacher of teacher_ft's shape with other weights."""
    from transformers import AutoTokenizer

    path = make_model(
        tmp_path_factory.mktemp("ft2") / "teacher_ft2",
        tiny_world["vocab_size"],
        hidden=64,
        layers=2,
        seed=4,
    )
    AutoTokenizer.from_pretrained(tiny_world["tokenizer"]).save_pretrained(path)
    return path


def _first_kd_loss(fields: dict, out: Path, **over: Any) -> list[float]:
    result = train(load_config(None, {**fields, "output_dir": str(out), **over}))
    return [h["kd_loss"] for h in result.history if "kd_loss" in h]


def test_multi_teacher_trains_and_averages_two_teachers(fields, tiny_world, other_teacher,
                                                        tmp_path):  # fmt: skip
    ft = str(tiny_world["teacher_ft"])
    delta = _first_kd_loss(fields, tmp_path / "delta", variant="delta")
    same = _first_kd_loss(fields, tmp_path / "same", variant="multi_teacher", teacher_ft2=ft)
    two = _first_kd_loss(
        fields, tmp_path / "two", variant="multi_teacher", teacher_ft2=str(other_teacher)
    )
    assert len(two) == 2 and all(v == v and v > 0 for v in two)  # finite, two steps
    # ½·(z + z) = z: with teacher_ft2 = teacher_ft the target is Delta-KD's, step for step
    assert same == pytest.approx(delta, rel=1e-5)
    # a different second teacher moves the target
    assert abs(two[0] - delta[0]) > 1e-3 * delta[0]


def test_multi_teacher_without_teacher_ft2_is_a_config_error(fields, tmp_path):
    with pytest.raises(ConfigError, match="teacher_ft2") as err:
        load_config(None, {**fields, "output_dir": str(tmp_path), "variant": "multi_teacher"})
    assert "set teacher_ft2=PATH" in str(err.value)


def test_demo_run_config_and_mini_config_give_teacher_ft2() -> None:
    from deltakd.data.mini import mini_world_dir
    from deltakd.data.vocab import resolve_model_path
    from deltakd.demo import mini_run_config

    world = mini_world_dir()
    assert (world / "teacher_ft2" / "model.safetensors").is_file()
    config = mini_run_config(
        {"method": "parallelogram", "variant": "multi_teacher"},
        max_steps=1,
        seed=0,
        output_dir="unused",
    )
    assert Path(config.teacher_ft2) == world / "teacher_ft2"
    # runs that never load it do not name it (their saved configs group with older runs)
    assert (
        mini_run_config({"method": "delta_kd"}, max_steps=1, seed=0, output_dir="x").teacher_ft2
        is None
    )
    assert config.method_needs_roles() == (
        "teacher_ft",
        "teacher_ft2",
        "student_raw",
        "teacher_raw",
    )
    yaml = Path(__file__).resolve().parents[3] / "configs" / "mini" / "parallelogram.yaml"
    mini = load_config(yaml, {"variant": "multi_teacher"})
    assert Path(resolve_model_path(mini.teacher_ft2)) == world / "teacher_ft2"
