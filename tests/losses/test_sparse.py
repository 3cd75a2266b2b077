"""Sparse (top-k + tail bucket) targets."""

from __future__ import annotations

import pytest
import torch

from deltakd.losses import SparseTarget, kd_loss


def test_sparse_with_k_equal_v_equals_dense():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 4, 12, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 12, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True], [True, True, False, True]])
    for chunk in (None, 3):
        sparse = SparseTarget.from_logits(t, k=12, temperature=1.7)
        assert sparse.tail_mass.abs().max() < 1e-12
        a = kd_loss(s, sparse, temperature=1.7, mask=mask, chunk_size=chunk)
        (ga,) = torch.autograd.grad(a, s)
        b = kd_loss(s, t, temperature=1.7, mask=mask)
        (gb,) = torch.autograd.grad(b, s)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ga, gb)


def test_tail_bucket_matches_explicit_bucketed_kl():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 20, generator=g, dtype=torch.float64)
    t = torch.randn(5, 20, generator=g, dtype=torch.float64) * 3
    sparse = SparseTarget.from_logits(t, k=4)
    got = kd_loss(s, sparse)
    p = torch.softmax(t, -1)
    q = torch.softmax(s, -1)
    ref = 0.0
    for row in range(5):
        top = sparse.indices[row]
        rest = torch.ones(20, dtype=torch.bool)
        rest[top] = False
        ref += (p[row, top] * (p[row, top].log() - q[row, top].log())).sum()
        pt, qt = p[row, rest].sum(), q[row, rest].sum()
        ref += pt * (pt.log() - qt.log())
    assert got.item() == pytest.approx(ref.item() / 5, rel=1e-9)
    # Bucketing loses information, so it never exceeds the dense KL (log-sum inequality).
    assert got <= kd_loss(s, t) + 1e-12


def test_sparse_kl_approaches_dense_as_k_grows():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(8, 64, generator=g)
    t = torch.randn(8, 64, generator=g) * 4
    dense = kd_loss(s, t).item()
    gaps = [dense - kd_loss(s, SparseTarget.from_logits(t, k)).item() for k in (2, 8, 32, 64)]
    assert gaps == sorted(gaps, reverse=True)
    assert abs(gaps[-1]) < 1e-5


def test_sparse_bad_input():
    s = torch.randn(2, 3, 10)
    sparse = SparseTarget.from_logits(torch.randn(2, 3, 10), k=4, temperature=2.0)
    with pytest.raises(ValueError, match=r"temperature 2\.0"):
        kd_loss(s, sparse, temperature=1.0)
    with pytest.raises(ValueError, match=r"'fkl' only"):
        kd_loss(s, sparse, divergence="rkl", temperature=2.0)
    with pytest.raises(ValueError, match="do not match"):
        kd_loss(s[:1], sparse, temperature=2.0)
    with pytest.raises(ValueError, match="same shape"):
        SparseTarget(sparse.indices, sparse.logprobs[..., :2], sparse.tail_mass)
    with pytest.raises(ValueError, match="k must be"):
        SparseTarget.from_logits(torch.randn(2, 5), k=6)


@pytest.mark.parametrize("k", [3, 10])
def test_sparse_gradcheck_float64(k):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 10, generator=g, dtype=torch.float64, requires_grad=True)
    sparse = SparseTarget.from_logits(torch.randn(4, 10, generator=g, dtype=torch.float64), k, 1.5)
    mask = torch.tensor([True, True, False, True])
    assert torch.autograd.gradcheck(lambda a: kd_loss(a, sparse, temperature=1.5, mask=mask), (s,))


def test_sparse_stays_finite_when_the_student_leaves_no_tail_mass():
    # float32 underflow: the student's mass outside the top-k is below the smallest normal.
    s = torch.full((2, 6), -200.0)
    s[:, :2] = 200.0
    t = torch.zeros(2, 6)
    sparse = SparseTarget.from_logits(t, k=2)  # tail mass 4/6 on tokens the student rules out
    s.requires_grad_()
    loss = kd_loss(s, sparse)
    loss.backward()
    assert torch.isfinite(loss) and loss > 100  # large, as it should be: KL is huge here
    assert torch.isfinite(s.grad).all()
