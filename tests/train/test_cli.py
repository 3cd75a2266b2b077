"""`deltakd train CONFIG key=value ...` end to end on the tiny world."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltakd.cli import main

REPO = Path(__file__).resolve().parents[2]


def _world_overrides(base: dict) -> list[str]:
    keys = ("student_raw", "teacher_ft", "teacher_raw", "tokenizer", "dataset", "max_length",
            "max_prompt_length", "device", "progress")  # fmt: skip
    return [f"{k}={base[k]}" for k in keys] + ["per_device_batch_size=2", "logging_steps=1"]


def test_shipped_mini_config_runs_with_overrides(base_overrides, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", str(REPO / "configs/mini/delta_kd.yaml"), f"output_dir={out}",
                 "max_steps=2", *_world_overrides(base_overrides)])  # fmt: skip
    assert code == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()  # the last step is always saved


def test_cli_errors_are_one_line_with_the_fix(tmp_path, capsys):
    code = main(["train", str(REPO / "configs/mini/kd.yaml"), f"output_dir={tmp_path}",
                 "divergence=kl"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "deltakd train: error: config field 'divergence' = 'kl' is not allowed" in err
    assert "Traceback" not in err


def _mini_world_built() -> bool:
    try:
        from deltakd.data.mini import mini_world_dir

        mini_world_dir()
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _mini_world_built(), reason="the mini world is not built yet")
def test_mini_delta_kd_config_runs_unchanged(tmp_path):
    # One step on 64 rows keeps the default run quick (tokenizing 4000 rows and importing take
    # most of a run); the slow test below runs every config unchanged for 4 steps.
    out = tmp_path / "dkd"
    assert main(["train", str(REPO / "configs/mini/delta_kd.yaml"), f"output_dir={out}",
                 "max_steps=1", "limit=64", "progress=false"]) == 0  # fmt: skip
    assert (out / "final" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _mini_world_built(), reason="the mini world is not built yet")
@pytest.mark.parametrize(
    "name", ["sft", "kd", "delta_kd", "parallelogram", "seqkd", "minillm", "on_policy"]
)
def test_every_mini_config_runs_unchanged(tmp_path, name):
    out = tmp_path / name
    assert main(["train", str(REPO / f"configs/mini/{name}.yaml"), f"output_dir={out}",
                 "max_steps=4", "progress=false"]) == 0  # fmt: skip
    assert (out / "final" / "config.json").is_file()
