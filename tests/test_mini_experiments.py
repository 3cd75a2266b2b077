"""scripts/mini_experiments.py: run keys (student role, MiniLLM from the SFT run, the world's
corpus), a run shared by two groups trained once, and MiniLLM waiting for its SFT run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mini_experiments.py"


@pytest.fixture(scope="module")
def exp():
    spec = importlib.util.spec_from_file_location("mini_experiments", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finish(out: Path, name: str, seed: int) -> None:
    run = out / name / f"seed-{seed}"
    run.mkdir(parents=True, exist_ok=True)
    (run / "scores.json").write_text(json.dumps({"name": name, "seed": seed, "diverged": False}))


def test_minillm_starts_from_the_same_seeds_sft_run_with_the_worlds_corpus(exp, tmp_path):
    minillm = exp.GROUPS["table1"]["minillm"]
    with pytest.raises(RuntimeError, match="sft seed 1 has not finished"):
        exp.resolve(minillm, 1, tmp_path, "v2")
    _finish(tmp_path, "sft", 1)
    cfg, student = exp.resolve(minillm, 1, tmp_path, "v2")
    assert cfg["student_raw"] == str((tmp_path / "sft" / "seed-1" / "final").resolve())
    assert "init_from" not in cfg and student == "student_raw"
    args = cfg["method_args"]
    assert args["pt_dataset"] == "mini2:corpus" and args["ppo_epochs"] == 4
    assert args["cliprange"] == 0.2 and args["importance_clip"] is None
    assert exp.resolve(minillm, 1, tmp_path, "v1")[0]["method_args"]["pt_dataset"] == "mini:corpus"
    # the group's own overrides are not modified by resolving them
    assert (
        minillm["init_from"] == "sft" and minillm["method_args"]["pt_dataset"] == exp.WORLD_CORPUS
    )


def test_groups_floor_and_alpha_2x(exp, tmp_path):
    assert exp.GROUPS["floor"]["delta_kd"] == exp.GROUPS["table1"]["delta_kd"]
    assert exp.GROUPS["floor"]["delta_kd_floor"]["delta_floor"] == -8.0
    runs = exp.GROUPS["alpha_2x"]
    assert {n for n in runs if n.startswith("alpha_2x_")} == {
        f"alpha_2x_{a}" for a in (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
    }
    # α = 0 is the fkl run of the same student (its target is z_teacher_ft exactly)
    assert runs["alpha_2x_0.0"] == {"same_as": "fkl_2x"}
    assert exp.GROUPS["alpha"]["alpha_0.0"] == {"same_as": "fkl"}
    runs = {n: o for n, o in runs.items() if "same_as" not in o}
    for name, overrides in runs.items():
        cfg, student = exp.resolve(overrides, 0, tmp_path, "v2")
        assert student == "student_raw_2x" and "student" not in cfg, name


def test_shared_runs_train_once_and_minillm_waits_for_sft(exp, tmp_path, monkeypatch, capsys):
    import torch

    calls: list[tuple[str, int, str]] = []

    def fake_run_one(name, overrides, seed, out, world="v1"):
        exp.resolve(overrides, seed, out, world)  # raises if a dependency is not there yet
        calls.append((name, seed, world))
        return {"name": name, "seed": seed, "diverged": False, "seconds": 0.0}

    monkeypatch.setattr(exp, "run_one", fake_run_one)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep the suite's threads
    out = tmp_path / "v2"
    monkeypatch.setattr(exp.time, "sleep", lambda s: pytest.fail("nothing to wait for"))
    argv = ["--world", "v2", "--out", str(out), "--seeds", "0", "--groups", "floor,table1",
            "--only", "minillm,delta_kd,sft,delta_kd_floor"]  # fmt: skip
    assert exp.main(argv) == 0
    names = [c[0] for c in calls]
    assert sorted(names) == ["delta_kd", "delta_kd_floor", "minillm", "sft"]  # delta_kd once
    assert names.index("sft") < names.index("minillm") and {c[2] for c in calls} == {"v2"}
    # resumable: a second run trains nothing
    calls.clear()
    assert exp.main(argv) == 0 and calls == []
    # a MiniLLM run whose SFT run is neither done nor scheduled is skipped with a hint
    assert exp.main(["--world", "v2", "--out", str(tmp_path / "x"), "--seeds", "3",
                     "--only", "minillm"]) == 0  # fmt: skip
    assert calls == [] and "skip minillm seed 3: run sft seed 3 first" in capsys.readouterr().out
    # shard 1/2 holds minillm, shard 0/2 its sft: this shard polls until the other finishes it
    out2 = tmp_path / "sharded"
    waits: list[float] = []

    def other_shard_finishes_sft(seconds):
        waits.append(seconds)
        _finish(out2, "sft", 0)

    monkeypatch.setattr(exp.time, "sleep", other_shard_finishes_sft)
    argv = ["--world", "v2", "--out", str(out2), "--seeds", "0", "--only", "sft,minillm",
            "--shard", "1/2"]  # fmt: skip
    assert exp.main(argv) == 0
    assert calls == [("minillm", 0, "v2")] and len(waits) == 1


def test_report_names_world_commit_and_models(exp, tmp_path):
    run = tmp_path / "fkl" / "seed-0"
    run.mkdir(parents=True)
    rec = {"name": "fkl", "seed": 0, "world": "v2", "commit": "abcdef0123456", "dirty": False,
           "model_sha256": {"teacher_ft": "f" * 64}, "diverged": False, "max_grad_norm": 2.0,
           "instruct_rouge1": 0.5, "math_rouge1": 0.6, "math_exact_match": 0.1}  # fmt: skip
    (run / "scores.json").write_text(json.dumps(rec))
    text = exp.report(["table1", "lamtau", "alpha"], tmp_path)
    assert "### table1" in text and "### lamtau" not in text  # no finished run: no table
    assert "### alpha" not in text  # its alpha_0.0 (= fkl) alone does not make a table
    assert "World v2" in text and "abcdef0123" in text and "teacher_ft ffffffffffff" in text
    assert "| fkl | 1 | 50.0 | 60.0 | 10.0 | 2.0 | 0 |" in text
