"""LocalReferences: frozen in-process models behind the ReferenceSource interface."""

from __future__ import annotations

import pytest
import torch

from deltakd.errors import ConfigError
from deltakd.references.local import LocalReferences


def test_fetch_returns_frozen_logits_of_each_role(tiny_world):
    paths = {r: str(tiny_world[r]) for r in ("teacher_ft", "teacher_raw", "student_raw")}
    with LocalReferences(paths, dtype="fp32") as src:
        assert src.roles == ("teacher_ft", "teacher_raw", "student_raw")
        ids = torch.randint(3, tiny_world["vocab_size"], (2, 7))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        src.prefetch(0, batch)  # a no-op for local models
        out = src.fetch(0, batch)
        assert set(out.logits) == set(paths) and out.wait_seconds >= 0
        for logits in out.logits.values():
            assert logits.shape == (2, 7, tiny_world["vocab_size"]) and not logits.requires_grad
        # The references are frozen: same batch, same logits; no parameter wants a gradient.
        again = src.fetch(1, batch)
        assert torch.equal(again.logits["teacher_ft"], out.logits["teacher_ft"])
        assert not any(p.requires_grad for m in src.models.values() for p in m.parameters())
        assert out.logits["teacher_ft"].dtype == torch.float32


def test_bf16_and_bad_inputs(tiny_world):
    src = LocalReferences({"teacher_ft": str(tiny_world["teacher_ft"])}, dtype="bf16")
    ids = torch.randint(3, 50, (1, 4))
    out = src.fetch(0, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    # A bf16 model answers float32 logits: its lm_head product is not rounded to bf16.
    assert out.logits["teacher_ft"].dtype == torch.float32
    with pytest.raises(ConfigError, match="unknown reference role 'teacher'"):
        LocalReferences({"teacher": str(tiny_world["teacher_ft"])})
    with pytest.raises(ConfigError, match="reference dtype 'fp8'"):
        LocalReferences({}, dtype="fp8")
    with pytest.raises(ConfigError, match="cannot load the teacher_raw model"):
        LocalReferences({"teacher_raw": str(tiny_world["tokenizer"])})


def test_hidden_state_mode_matches_logits(tiny_world):
    paths = {r: str(tiny_world[r]) for r in ("teacher_ft", "student_raw")}
    ids = torch.randint(3, tiny_world["vocab_size"], (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dense = LocalReferences(paths).fetch(0, batch)
    src = LocalReferences(paths, hidden_states=True)
    out = src.fetch(0, batch)
    heads = src.lm_heads()
    assert not out.logits and set(out.hidden) == set(heads) == set(paths)
    for role in paths:
        assert out.hidden[role].shape == (2, 6, heads[role].weight.shape[1])
        torch.testing.assert_close(heads[role].apply(out.hidden[role]), dense.logits[role])
