"""The default method loss: the SFT term at λ = 0 is logged without a graph."""

from __future__ import annotations

import torch

from deltakd.train.methods import StudentBatch, sft_sum, sft_sum_for_logging


def _batch(seed: int = 0) -> StudentBatch:
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(3, 9, 40, generator=g, requires_grad=True)  # (B, T, V + padding rows)
    logits = full[:, :-1, :33]  # (B, T-1, V): a non-contiguous slice, as in the trainer
    labels = torch.randint(0, 33, (3, 8), generator=g)
    mask = torch.rand(3, 8, generator=g) > 0.4
    ids = torch.zeros(3, 9, dtype=torch.long)
    return StudentBatch(ids, torch.ones_like(ids), logits, labels, mask, {})


def test_logging_sft_equals_sft_sum_without_a_graph():
    batch = _batch()
    want = sft_sum(batch)
    for rows in (1, 4, 1024):
        got = sft_sum_for_logging(batch, rows_per_chunk=rows)
        assert not got.requires_grad
        torch.testing.assert_close(got, want.detach())


def test_nothing_counted_gives_zero():
    batch = _batch()
    batch.mask[:] = False
    assert sft_sum_for_logging(batch).item() == 0.0
