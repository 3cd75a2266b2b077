"""A run killed with SIGKILL resumes from its last checkpoint and ends bit-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from deltakd.train import load_config, train


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(base_overrides, tmp_path):
    common = {**base_overrides, "method": "delta_kd", "max_steps": 16, "save_steps": 2,
              "save_total_limit": None, "per_device_batch_size": 2, "resume": "auto",
              "lr_scheduler": "cosine", "learning_rate": 3e-3}  # fmt: skip
    full = train(load_config(None, {**common, "output_dir": str(tmp_path / "full")}))

    run_dir = tmp_path / "killed"
    cfg = tmp_path / "killed.yaml"
    cfg.write_text(yaml.safe_dump({**common, "output_dir": str(run_dir)}))
    cmd = [sys.executable, "-m", "deltakd.cli", "train", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoint-4").exists():  # kill somewhere after step 4
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run_dir / "final").exists()

    resumed = train(load_config(None, {**common, "output_dir": str(run_dir)}))
    assert resumed.resumed_from is not None
    assert resumed.losses() == full.losses()
    wa = load_file(str(full.final_dir / "model.safetensors"))
    wb = load_file(str(resumed.final_dir / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_sigterm_to_the_cli_checkpoints_and_exits_143(base_overrides, tmp_path):
    common = {**base_overrides, "method": "sft", "max_steps": 200, "save_steps": 2,
              "save_total_limit": 2, "per_device_batch_size": 2, "resume": "auto"}  # fmt: skip
    run_dir = tmp_path / "termed"
    cfg = tmp_path / "termed.yaml"
    cfg.write_text(yaml.safe_dump({**common, "output_dir": str(run_dir)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deltakd.cli", "train", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoint-2").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    assert "stopped by SIGTERM after step" in out and "Run the same command again" in out
    step = int(out.split("after step ")[1].split(";")[0])
    assert (run_dir / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (run_dir / "final").exists()
