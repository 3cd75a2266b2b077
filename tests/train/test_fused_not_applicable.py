"""`fused_loss: true` (as the shipped 7B configs set it) with a method that has no fixed
target to fuse (MiniLLM) is set aside with one log line instead of refused, so a user who
switches `method` on a shipped config is not stopped by it."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from deltakd.train import load_config

REPO = Path(__file__).resolve().parents[2]


def test_minillm_sets_fused_loss_aside_with_one_log_line(base_overrides, tmp_path, caplog):
    over = {**base_overrides, "output_dir": str(tmp_path), "method": "minillm",
            "fused_loss": True}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="deltakd.train"):
        config = load_config(None, over)
    assert config.fused_loss is False
    lines = [r.getMessage() for r in caplog.records if "fused_loss" in r.getMessage()]
    assert lines == [
        "fused_loss does not apply to method 'minillm' (it has no fixed target to fuse); "
        "training with full logits."
    ]


def test_shipped_config_with_method_minillm_loads(base_overrides, tmp_path):
    shipped = yaml.safe_load((REPO / "configs/qwen2.5-7b-to-1.5b-ultrachat.yaml").read_text())
    assert shipped["fused_loss"] is True
    over = {**base_overrides, "output_dir": str(tmp_path), "method": "minillm", "lam": 0.0}
    config = load_config(str(REPO / "configs/qwen2.5-7b-to-1.5b-ultrachat.yaml"), over)
    assert config.method == "minillm" and config.fused_loss is False


def test_a_fixed_target_keeps_fused_loss(base_overrides, tmp_path):
    config = load_config(None, {**base_overrides, "output_dir": str(tmp_path),
                                "method": "delta_kd", "fused_loss": True})  # fmt: skip
    assert config.fused_loss is True
