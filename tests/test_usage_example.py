"""docs/USAGE.md opens with a notebook example on the mini world: run that very code."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def first_python_block(text: str) -> str:
    match = re.search(r"```python\n(.*?)```", text, flags=re.S)
    assert match, "docs/USAGE.md has no ```python block"
    return match.group(1)


def test_usage_opens_with_a_notebook_example_that_runs(tmp_path, monkeypatch, capsys):
    import torch

    text = (REPO / "docs" / "USAGE.md").read_text(encoding="utf-8")
    # the example is the first thing a reader meets, before the CLI
    assert text.index("```python") < text.index("## Training with `deltakd train`")
    code = first_python_block(text)
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    namespace: dict = {}
    exec(compile(code, "docs/USAGE.md", "exec"), namespace)
    final = tmp_path / "runs" / "notebook" / "final"
    assert (final / "model.safetensors").is_file()
    assert (final / "README.md").read_text(encoding="utf-8").startswith("---\n")
    scores = namespace["scores"]
    assert 0.0 <= scores["eval_rouge1"] <= 1.0
    assert scores["eval_kd_loss"] > 0
    history = namespace["trainer"].state.log_history
    # the loss falls from the first logged step to the last
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0]
    out = capsys.readouterr().out
    assert "[train] delta_kd: 20 steps" in out
    assert "{'loss'" not in out
