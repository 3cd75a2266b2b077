"""Teacher servers under `torchrun --nproc_per_node 2` (gloo, CPU) at Qwen2.5's vocabulary
rows: one shared server set serves both ranks, numbers equal local references', a killed
server is noticed on every rank and restarted, nothing is left in /dev/shm. Slow: three
launched servers and two trainer processes (`tests/references/torchrun_servers.py`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.references import real_shape

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_shared_servers_under_torchrun_match_local_and_survive_a_kill(tmp_path: Path) -> None:
    world = tmp_path / "world"
    real_shape.build_world(world)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29731",
           str(ROOT / "tests" / "references" / "torchrun_servers.py"), str(world), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = (json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1))
    # One server set, launched by local rank 0, used by both ranks.
    assert all(r0["launched"].values()) and not any(r1["launched"].values())
    assert r0["server_pids"] == r1["server_pids"]
    for r in (r0, r1):
        for step in r["steps"]:
            assert abs(step["loss_servers"] - step["loss_local"]) < 1e-5, step
            assert step["grad_diff"] < 1e-5, step
        # The kill was noticed on every rank and the server came back once.
        assert r["restarts"] == {"teacher_ft": 1, "teacher_raw": 0, "student_raw": 0}
        assert r["server_pids_after"]["teacher_ft"] != r["server_pids"]["teacher_ft"]
        assert r["segments_left"] == []
    assert r0["server_pids_after"] == r1["server_pids_after"]
    left = [p.name for p in Path("/dev/shm").iterdir()
            if r0["run_id"] in p.name or r1["run_id"] in p.name]  # fmt: skip
    assert left == []


@pytest.mark.slow
def test_training_under_torchrun_with_one_shared_server_set_equals_local_references(
    tmp_path: Path,
) -> None:
    """`deltakd train` on 2 ranks with `placement: shared` and `fused_loss` (servers answer
    hidden states, `output: auto`) trains the same student as local references."""
    import torch
    from safetensors.torch import load_file

    world = tmp_path / "world"
    real_shape.build_world(world)
    rows = [{"prompt": f"what is {i} plus {i}?", "response": f"it is {2 * i}."} for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = [f"{r}: {world / r}" for r in real_shape.ROLES] + [
        f"tokenizer: {world / 'tokenizer'}", f"dataset: {data}", "method: delta_kd",
        "max_length: 32", "max_prompt_length: 16", "per_device_batch_size: 1", "max_steps: 3",
        "learning_rate: 0.01", "logging_steps: 1", "save_steps: 0", "device: cpu",
        "fused_loss: true", "shuffle: false",
    ]  # fmt: skip
    config = tmp_path / "run.yaml"
    config.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    torchrun = Path(sys.executable).with_name("torchrun")
    finals = {}
    for name, extra in (
        ("local", ["references=local"]),
        ("servers", ["references=servers", "servers.placement=shared", "servers.threads=1",
                     "servers.batch_window_ms=5", "servers.dtype=fp32"]),
    ):  # fmt: skip
        cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29733", "-m",
               "deltakd.cli", "train", str(config), f"output_dir={tmp_path / name}", *extra]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        finals[name] = load_file(str(tmp_path / name / "final" / "model.safetensors"))
        if name == "servers":
            launched = [ln for ln in proc.stderr.splitlines() if "launched" in ln]
            assert len(launched) == 3, launched  # one set for both ranks
    for key, value in finals["local"].items():
        torch.testing.assert_close(finals["servers"][key], value, atol=1e-5, rtol=1e-4)
