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
