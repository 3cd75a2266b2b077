"""`deltakd report` on synthetic run directories: grouping, mean ± std, plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from deltakd.cli import main
from deltakd.errors import DataError
from deltakd.eval.report import build_report, discover_runs, grouping_keys

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROUGE1 = {0.0: [0.30, 0.34, 0.35], 1.0: [0.40, 0.42, 0.47]}


def _make_run(root: Path, alpha: float, seed: int, rouge1: float, *, blowup: bool = False) -> Path:
    run = root / f"alpha-{alpha}_seed-{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        f"method: delta_kd\nalpha: {alpha}\nseed: {seed}\nlr: 0.001\noutput_dir: {run}\n"
    )
    (run / "eval.json").write_text(
        json.dumps(
            {"rouge1": rouge1, "rouge2": rouge1 / 2, "rougeL": rouge1, "exact_match": None, "n": 10}
        )
    )
    with open(run / "history.jsonl", "w") as f:
        for step in range(1, 6):
            grad = 10.0**step if blowup else 1.0 + seed
            f.write(json.dumps({"step": step, "loss": 2.0 / step + seed, "grad_norm": grad}) + "\n")
    return run


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for alpha, values in ROUGE1.items():
        for seed, v in enumerate(values):
            _make_run(root, alpha, seed, v, blowup=alpha == 1.0)
    return root


def test_groups_by_config_without_seed_and_computes_mean_std(sweep_dir, tmp_path) -> None:
    rep = build_report([sweep_dir], out_dir=tmp_path / "rep")
    assert [g["params"] for g in rep.groups] == [{"alpha": 0.0}, {"alpha": 1.0}]
    for g, values in zip(rep.groups, ROUGE1.values()):
        stat = g["metrics"]["rouge1"]
        assert stat["n"] == 3
        assert stat["mean"] == pytest.approx(statistics.mean(values))
        assert stat["std"] == pytest.approx(statistics.stdev(values))  # sample std, ddof=1
        assert sorted(g["seeds"]) == [0, 1, 2]
        assert "exact_match" not in g["metrics"]  # all null
    # final loss per seed is 2/5 + seed -> mean 1.4, std 1
    assert rep.groups[0]["metrics"]["final_loss"]["mean"] == pytest.approx(1.4)
    assert rep.groups[0]["metrics"]["final_loss"]["std"] == pytest.approx(1.0)
    assert rep.groups[1]["metrics"]["max_grad_norm"]["mean"] == pytest.approx(1e5)

    md = (tmp_path / "rep" / "report.md").read_text()
    # alpha=0 row: ROUGE-1 mean 33.00, std 2.65 (×100)
    assert "| alpha=0.0 | 3 | 33.00 ± 2.65 |" in md
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["groups"][1]["metrics"]["rouge1"]["mean"] == pytest.approx(0.43)

    names = sorted(Path(p).name for p in rep.plots)
    assert names == ["grad_norm.png", "rouge1_vs_alpha.png", "training_loss.png"]
    for p in rep.plots:
        data = Path(p).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_report_cli_json(sweep_dir, tmp_path, capsys) -> None:
    run_dirs = [str(d) for d in sorted(sweep_dir.iterdir())]
    assert main(["report", *run_dirs, "--out", str(tmp_path / "r2"), "--json", "--no-plots"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(last["groups"]) == 2 and last["plots"] == []
    assert not list((tmp_path / "r2").glob("*.png"))
    assert (tmp_path / "r2" / "report.md").read_text().count("| alpha=") == 2


def test_single_group_and_no_alpha_plot(tmp_path) -> None:
    for seed, v in enumerate([0.2, 0.4]):
        _make_run(tmp_path / "s", 0.5, seed, v)
    rep = build_report([tmp_path / "s"], out_dir=tmp_path / "rep")
    assert len(rep.groups) == 1 and rep.groups[0]["label"] == "all runs"
    assert rep.groups[0]["metrics"]["rouge1"]["mean"] == pytest.approx(0.3)
    assert not any("alpha" in Path(p).name for p in rep.plots)


def test_trainer_state_log_history_is_read(tmp_path) -> None:
    run = tmp_path / "hf"
    (run / "checkpoint-4").mkdir(parents=True)
    (run / "eval.json").write_text(json.dumps({"rouge1": 0.5, "rouge2": 0.1, "rougeL": 0.4}))
    state = {"log_history": [{"step": 2, "loss": 3.0, "grad_norm": 1.0}, {"step": 4, "loss": 1.0}]}
    (run / "checkpoint-4" / "trainer_state.json").write_text(json.dumps(state))
    (run_,) = discover_runs([run])
    assert run_.series(("loss",)) == ([2.0, 4.0], [3.0, 1.0])
    assert grouping_keys([run_]) == []


def test_not_a_run_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no runs"):
        discover_runs([tmp_path / "empty"])


def test_eval_only_dirs_are_reference_rows(sweep_dir, tmp_path) -> None:
    from deltakd.eval.evaluate import EvalResult

    for model, score in (("mini:teacher_ft", 0.6), ("mini:student_raw", 0.1)):
        res = EvalResult(rouge1=score, rouge2=0.0, rougeL=score, exact_match=None, n=4,
                         meta={"model": model})  # fmt: skip
        res.save(tmp_path / "evals" / model.split(":")[1])
    evals = sorted((tmp_path / "evals").iterdir())
    rep = build_report([*evals, sweep_dir], out_dir=tmp_path / "rep", plots=False)
    labels = [g["label"] for g in rep.groups]
    assert labels == ["model=mini:student_raw", "model=mini:teacher_ft", "alpha=0.0", "alpha=1.0"]
    assert rep.groups[1]["metrics"]["rouge1"]["mean"] == pytest.approx(0.6)
    assert rep.groups[1]["metrics"]["rouge1"]["n"] == 1
    assert rep.groups[1]["metrics"]["rouge1"]["std"] is None  # one value has no spread
    assert "| model=mini:teacher_ft | 1 | 60.00 | 0.00 | 60.00 |" in rep.markdown


def test_int_and_float_config_values_group_together(tmp_path) -> None:
    a = _make_run(tmp_path / "x", 0.0, 0, 0.2)  # alpha: 0.0 in config.yaml
    b = tmp_path / "y" / "run"
    b.mkdir(parents=True)
    (b / "sweep.json").write_text(json.dumps({"overrides": {"alpha": 0, "lr": 0.001, "seed": 1}}))
    (b / "config.yaml").write_text("method: delta_kd\nlr: 0.001\nseed: 1\n")  # no alpha saved
    (b / "eval.json").write_text(json.dumps({"rouge1": 0.4, "rouge2": 0.0, "rougeL": 0.4}))
    rep = build_report([a, b], out_dir=tmp_path / "rep", plots=False)
    assert len(rep.groups) == 1
    assert rep.groups[0]["metrics"]["rouge1"]["mean"] == pytest.approx(0.3)


def _make_script_run(root: Path, name: str, seed: int, alpha: float, scores: dict | None) -> Path:
    """A run directory as scripts/mini_experiments.py leaves it: config.yaml, history.jsonl and
    scores.json with per-task scores (`scores=None`: the run diverged)."""
    run = root / name / f"seed-{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        f"method: delta_kd\nalpha: {alpha}\nseed: {seed}\noutput_dir: {run}\n"
    )
    record: dict = {"name": name, "seed": seed, "overrides": {"alpha": alpha}, "seconds": 9.0}
    if scores is None:
        record.update(diverged=True, error="loss is NaN at step 3")
    else:
        record.update(diverged=False, **scores)
    (run / "scores.json").write_text(json.dumps(record))
    with open(run / "history.jsonl", "w") as f:
        for step in range(1, 4):
            f.write(json.dumps({"step": step, "loss": 1.0 / step, "grad_norm": 1.0 + alpha}) + "\n")
    (run / "instruct").mkdir()  # the per-task eval dirs inside a run are not runs of their own
    (run / "instruct" / "metrics.json").write_text(json.dumps({"rouge1": 0.99}))
    return run


def _task_scores(instruct: float, math: float, em: float) -> dict:
    return {"instruct_rouge1": instruct, "instruct_rougeL": instruct, "math_rouge1": math,
            "math_rougeL": math, "math_exact_match": em}  # fmt: skip


def test_script_run_dirs_give_per_task_columns(tmp_path) -> None:
    root = tmp_path / "exp"
    for seed, (i, m) in enumerate([(0.30, 0.50), (0.34, 0.56), (0.38, 0.53)]):
        _make_script_run(root, "alpha_0.0", seed, 0.0, _task_scores(i, m, 0.1 * seed))
    for seed, (i, m) in enumerate([(0.40, 0.60), (0.44, 0.62)]):
        _make_script_run(root, "delta_kd", seed, 1.0, _task_scores(i, m, 0.0))
    _make_script_run(root, "delta_kd", 2, 1.0, None)  # diverged: counted, not scored

    # `exp` holds <name>/seed-<s>/: runs two levels down are found
    rep = build_report([root], out_dir=tmp_path / "rep")
    assert [g["label"] for g in rep.groups] == ["alpha_0.0", "delta_kd"]  # the script's names
    first, second = rep.groups
    assert first["metrics"]["instruct/rouge1"]["mean"] == pytest.approx(0.34)
    assert first["metrics"]["instruct/rouge1"]["std"] == pytest.approx(0.04)
    assert first["metrics"]["math/exact_match"]["values"] == pytest.approx([0.0, 0.1, 0.2])
    assert "rouge1" not in first["metrics"]  # no task-less score was given
    assert second["diverged"] == 1 and second["metrics"]["math/rouge1"]["n"] == 2
    head = rep.markdown.split("\n| alpha_0.0")[0].splitlines()[-2]
    assert head.startswith(
        "| run group | seeds | instruct ROUGE-1 | instruct ROUGE-L | math ROUGE-1"
    )
    assert "math exact match" in head and "diverged runs" in head
    assert "| alpha_0.0 | 3 | 34.00 ± 4.00 | 34.00 ± 4.00 | 53.00 ± 3.00 |" in rep.markdown

    names = sorted(Path(p).name for p in rep.plots)
    assert names == ["grad_norm.png", "rouge1_vs_alpha.png", "training_loss.png"]
    assert all(Path(p).read_bytes().startswith(PNG_MAGIC) for p in rep.plots)


def test_script_and_sweep_runs_report_together(sweep_dir, tmp_path) -> None:
    run = _make_script_run(tmp_path / "exp", "delta_kd", 0, 1.0, _task_scores(0.4, 0.6, 0.0))
    rep = build_report([sweep_dir, run], out_dir=tmp_path / "rep", plots=False)
    keys = [k for g in rep.groups for k in g["metrics"]]
    assert "rouge1" in keys and "instruct/rouge1" in keys
    assert "| ROUGE-1 |" in rep.markdown and "| instruct ROUGE-1 |" in rep.markdown
