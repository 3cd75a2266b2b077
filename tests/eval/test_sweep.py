"""`deltakd sweep`: grid parsing, resumability, evaluation of each run, then `report`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from deltakd.errors import ConfigError
from deltakd.eval.report import build_report
from deltakd.eval.sweep import expand_grid, parse_grid, run_name, run_sweep
from deltakd.generation import GenerationSettings

ROWS = [
    {"prompt": "what colour is the fox?", "response": "the fox is red."},
    {"prompt": "seven plus six?", "response": "seven plus six is thirteen."},
]


def test_parse_and_expand_grid() -> None:
    grid = parse_grid(["alpha=0,0.5,1", "seed=0,1", "divergence=fkl"])
    assert grid == {"alpha": [0, 0.5, 1], "seed": [0, 1], "divergence": ["fkl"]}
    points = expand_grid(grid)
    assert len(points) == 6
    assert points[0] == {"alpha": 0, "seed": 0, "divergence": "fkl"}
    assert points[1] == {"alpha": 0, "seed": 1, "divergence": "fkl"}
    assert run_name(points[-1]) == "alpha-1_seed-1_divergence-fkl"
    assert len({run_name(p) for p in points}) == 6
    with pytest.raises(ConfigError, match="KEY=V1,V2"):
        parse_grid(["alpha"])
    with pytest.raises(ConfigError, match="twice"):
        parse_grid(["seed=0", "seed=1"])
    with pytest.raises(ConfigError, match="repeats"):
        parse_grid(["seed=0,0"])


@pytest.fixture
def sweep_setup(tiny_world: dict, tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"method: delta_kd\nstudent_raw: {tiny_world['student_raw']}\n"
        f"teacher_ft: {tiny_world['teacher_ft']}\nteacher_raw: {tiny_world['teacher_raw']}\n"
        f"dataset: {data}\nmax_steps: 3\n"
    )
    return config, tmp_path / "sweep"


def _fake_train(tiny_world: dict, calls: list[dict[str, Any]]):
    """Stands in for the trainer: saves the student as final/ and logs a short history."""

    def train(config_path: str, overrides: dict[str, Any]) -> None:
        calls.append(dict(overrides))
        out = Path(overrides["output_dir"])
        shutil.copytree(tiny_world["student_raw"], out / "final", dirs_exist_ok=True)
        with open(out / "history.jsonl", "w") as f:
            for step in (1, 2, 3):
                loss = 1.0 / step + overrides["alpha"]
                f.write(json.dumps({"step": step, "loss": loss, "grad_norm": 1.0}) + "\n")

    return train


def test_sweep_runs_grid_and_resumes(tiny_world, sweep_setup, caplog) -> None:
    config, out = sweep_setup
    calls: list[dict[str, Any]] = []
    grid = parse_grid(["alpha=0.5", "seed=0,1"])
    settings = GenerationSettings(max_new_tokens=4, batch_size=2)
    train = _fake_train(tiny_world, calls)
    kwargs = dict(out_dir=out, settings=settings, train_fn=train, progress=False)

    with caplog.at_level("WARNING", logger="deltakd.eval"):
        res = run_sweep(config, grid, fixed={"lam": 0.1}, **kwargs)
    assert [r["status"] for r in res] == ["trained", "trained"]
    # the config's JSONL file has no splits: the runs are scored on their training rows
    assert "training rows" in caplog.text and "--eval-data" in caplog.text
    assert calls == [
        {"lam": 0.1, "alpha": 0.5, "seed": 0, "output_dir": str(out / "alpha-0.5_seed-0")},
        {"lam": 0.1, "alpha": 0.5, "seed": 1, "output_dir": str(out / "alpha-0.5_seed-1")},
    ]
    for r in res:
        saved = json.loads((Path(r["dir"]) / "eval.json").read_text())
        assert saved["n"] == 2 and 0.0 <= saved["rouge1"] <= 1.0
        assert saved == r["metrics"]
        assert (Path(r["dir"]) / "eval" / "predictions.jsonl").is_file()
        meta = json.loads((Path(r["dir"]) / "sweep.json").read_text())
        assert meta["overrides"] == {"lam": 0.1, "alpha": 0.5, "seed": int(r["name"][-1])}
    # the same student in both runs and greedy decoding: identical scores
    assert res[0]["metrics"] == res[1]["metrics"]

    # Resumable: nothing is retrained; a run whose eval is lost is only re-evaluated.
    (out / "alpha-0.5_seed-1" / "eval.json").unlink()
    again = run_sweep(config, grid, fixed={"lam": 0.1}, **kwargs)
    assert [r["status"] for r in again] == ["done", "evaluated"]
    assert len(calls) == 2


def test_sweep_refuses_a_train_fn_that_saves_nothing(sweep_setup) -> None:
    config, out = sweep_setup
    with pytest.raises(ConfigError, match="final"):
        run_sweep(config, {"seed": [0]}, out_dir=out, train_fn=lambda c, o: None, progress=False)


def test_sweep_dry_run_and_bad_inputs(sweep_setup, tmp_path) -> None:
    config, out = sweep_setup
    res = run_sweep(
        config, {"alpha": [0, 1]}, out_dir=out, dry_run=True, train_fn=lambda c, o: 1 / 0
    )
    assert [r["status"] for r in res] == ["planned", "planned"] and not out.exists()
    with pytest.raises(ConfigError, match="output_dir"):
        run_sweep(config, {"output_dir": ["a"]}, out_dir=out)
    with pytest.raises(ConfigError, match="both"):
        run_sweep(config, {"seed": [0]}, fixed={"seed": 1}, out_dir=out)
    with pytest.raises(ConfigError, match="does not exist"):
        run_sweep(tmp_path / "nope.yaml", {"seed": [0]}, out_dir=out)


def test_tiny_grid_through_the_real_trainer_and_report(sweep_setup, tmp_path) -> None:
    """Plumbing: `deltakd sweep` → deltakd.train.train → evaluate → `deltakd report`."""
    from deltakd.cli import main

    config, out = sweep_setup
    with open(config, "a") as f:
        f.write(
            "max_length: 64\nmax_prompt_length: 32\nper_device_batch_size: 2\nmax_steps: 2\n"
            "logging_steps: 1\nsave_steps: 0\ndevice: cpu\nprogress: false\n"
        )
    argv = ["sweep", str(config), "--grid", "alpha=0,1", "--out", str(out),
            "--max-new-tokens", "4", "--json"]  # fmt: skip
    assert main(argv) == 0
    for name in ("alpha-0", "alpha-1"):
        run = out / name
        assert (run / "final" / "config.json").is_file()
        assert (run / "config.yaml").is_file() and (run / "history.jsonl").is_file()
        assert json.loads((run / "eval.json").read_text())["n"] == len(ROWS)
    assert main([*argv[:-1]]) == 0  # everything finished: skipped, nothing retrained

    rep = build_report([out], out_dir=tmp_path / "rep")
    assert [g["params"] for g in rep.groups] == [{"alpha": 0.0}, {"alpha": 1.0}]
    assert all("final_loss" in g["metrics"] and "max_grad_norm" in g["metrics"] for g in rep.groups)
    assert {Path(p).name for p in rep.plots} == {
        "rouge1_vs_alpha.png",
        "training_loss.png",
        "grad_norm.png",
    }


def test_diverged_runs_are_recorded_and_the_sweep_goes_on(
    tiny_world, sweep_setup, tmp_path
) -> None:
    from deltakd.errors import NonFiniteError

    config, out = sweep_setup
    calls: list[dict[str, Any]] = []
    ok = _fake_train(tiny_world, calls)

    def train(config_path: str, overrides: dict[str, Any]) -> None:
        if overrides["alpha"] == 1:
            calls.append(dict(overrides))
            with open(Path(overrides["output_dir"]) / "history.jsonl", "w") as f:
                for step in (1, 2):
                    f.write(json.dumps({"step": step, "loss": 1.0, "grad_norm": 10.0**step}) + "\n")
            raise NonFiniteError("the gradient norm is inf at optimizer step 3")
        ok(config_path, overrides)

    kw = dict(
        out_dir=out, train_fn=train, settings=GenerationSettings(max_new_tokens=2), progress=False
    )
    res = run_sweep(config, {"alpha": [1, 0]}, **kw)
    assert [r["status"] for r in res] == ["failed", "trained"]
    assert "inf" in res[0]["error"]
    assert json.loads((out / "alpha-1" / "failed.json").read_text())["kind"] == "NonFiniteError"
    assert not (out / "alpha-1" / "eval.json").exists()

    assert [r["status"] for r in run_sweep(config, {"alpha": [1, 0]}, **kw)] == ["failed", "done"]
    assert len(calls) == 2  # the diverged run is not retrained by default...
    run_sweep(config, {"alpha": [1]}, retry_failed=True, **kw)
    assert len(calls) == 3  # ...only when asked

    rep = build_report([out], out_dir=tmp_path / "rep", plots=False)
    by_alpha = {g["params"]["alpha"]: g for g in rep.groups}
    assert by_alpha[1]["diverged"] == 1 and "rouge1" not in by_alpha[1]["metrics"]
    assert by_alpha[1]["metrics"]["max_grad_norm"]["mean"] == pytest.approx(100.0)
    assert by_alpha[0]["diverged"] == 0
    assert "diverged runs" in rep.markdown and "1 diverged" in rep.markdown


def test_several_configs_prefix_run_names(tiny_world, sweep_setup, tmp_path) -> None:
    config, out = sweep_setup
    other = tmp_path / "kd.yaml"
    other.write_text(config.read_text().replace("method: delta_kd", "method: kd"))
    calls: list[dict[str, Any]] = []
    seen: list[str] = []
    fake = _fake_train(tiny_world, calls)

    def train(config_path: str, overrides: dict[str, Any]) -> None:
        seen.append(Path(config_path).name)
        fake(config_path, {**overrides, "alpha": 0})

    res = run_sweep([config, other], {"seed": [0]}, out_dir=out, train_fn=train,
                    settings=GenerationSettings(max_new_tokens=2), progress=False)  # fmt: skip
    assert [r["name"] for r in res] == ["cfg_seed-0", "kd_seed-0"]
    assert seen == ["cfg.yaml", "kd.yaml"]
    rep = build_report([out], out_dir=tmp_path / "rep", plots=False)
    assert [g["label"] for g in rep.groups] == ["config=cfg", "config=kd"]
