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
