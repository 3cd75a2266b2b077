"""`deltakd bench pipeline` runs the three modes through the real trainer (slow: 3 trainings)."""

from __future__ import annotations

import json

import pytest

from deltakd.cli import main


@pytest.mark.slow
def test_bench_pipeline_reports_every_mode(tiny_world: dict, capsys: pytest.CaptureFixture) -> None:
    world = tiny_world["tokenizer"].parent  # tokenizer/, teacher_ft/, teacher_raw/, student_raw/
    argv = ["bench", "pipeline", "--world", str(world), "--method", "kd", "--steps", "3"]
    assert main([*argv, "--batch", "2", "--max-length", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for mode in ("local", "servers", "servers_prefetch"):
        assert result[f"{mode}_steps_per_s"] > 0
        assert 0.0 <= result[f"{mode}_wait_fraction"] <= 1.0
    # with prefetch the trainer waits less than when it asks only when it needs the batch
    assert result["servers_prefetch_wait_fraction"] < result["servers_wait_fraction"]
