"""`deltakd demo --quick` end to end on the shipped mini world (the issue asks the suite to)."""

from __future__ import annotations

import json

from deltakd.cli import main


def test_quick_demo_trains_evaluates_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| delta_kd |" in printed and "demo took" in printed

    result = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["teacher_ft", "student_raw", "sft", "kd", "delta_kd"]
    for row in rows.values():
        for key in ("instruct_rouge1", "instruct_rougeL", "math_rouge1", "math_rougeL"):
            assert 0.0 <= row[key] <= 1.0
        assert 0.0 <= row["math_exact_match"] <= 1.0
    # The world has something to distil, and distilling it helps the student.
    assert rows["teacher_ft"]["instruct_rouge1"] > 3 * rows["student_raw"]["instruct_rouge1"]
    best = max(rows[m]["instruct_rouge1"] for m in ("sft", "kd", "delta_kd"))
    assert best > rows["student_raw"]["instruct_rouge1"]
    for name in ("results.md", "curves.png", "rouge1.png"):
        assert (out / name).stat().st_size > 0
    for method in ("sft", "kd", "delta_kd"):
        assert (out / method / "final" / "config.json").exists()


def test_demo_refuses_unknown_methods(capsys):
    assert main(["demo", "--quick", "--methods", "sft,nope"]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err


def test_mini_run_config_takes_the_world_and_the_student():
    from pathlib import Path

    import pytest

    from deltakd.data.mini import mini_world_dir
    from deltakd.demo import mini_run_config
    from deltakd.errors import ConfigError

    v1, v2 = mini_world_dir("v1"), mini_world_dir("v2")
    default = mini_run_config({"method": "kd"}, max_steps=1, seed=0, output_dir="x")
    assert Path(default.student_raw) == v1 / "student_raw"  # the demo stays in world v1
    assert Path(default.teacher_ft) == v1 / "teacher_ft"
    cfg = mini_run_config({"method": "delta_kd"}, max_steps=1, seed=0, output_dir="x",
                          world="v2", student="student_raw_2x")  # fmt: skip
    assert Path(cfg.student_raw) == v2 / "student_raw_2x"
    assert (Path(cfg.teacher_ft), Path(cfg.teacher_raw)) == (v2 / "teacher_ft", v2 / "teacher_raw")
    with pytest.raises(ConfigError, match="mini world v1 has no student 'student_raw_2x'"):
        mini_run_config({}, max_steps=1, seed=0, output_dir="x", student="student_raw_2x")
