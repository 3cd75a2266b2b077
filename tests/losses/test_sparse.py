"""Sparse (top-k + tail bucket) targets."""

from __future__ import annotations

import pytest
import torch

from deltakd.losses import SparseTarget, fit_tail_model, kd_loss


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


# --- the low-rank tail model ---------------------------------------------------------------


def _low_rank_logits(n: int, v: int, rank: int, seed: int) -> torch.Tensor:
    """Logits that are linear in an r-dim hidden state, like a model's: (n, V), float64."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, rank, generator=g, dtype=torch.float64)
    w = torch.randn(rank, v, generator=g, dtype=torch.float64)
    return 2.0 * h @ w


def _kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    p = p_logp.exp()
    return torch.where(p > 0, p * (p_logp - q_logp), 0.0).sum(-1)


def test_tail_model_of_full_rank_reconstructs_the_dense_target():
    z = _low_rank_logits(40, 30, rank=30, seed=4)
    logp = torch.log_softmax(z, -1)
    basis, offset = fit_tail_model(logp, rank=30)
    sparse = SparseTarget.from_logits(z, k=5, tail_basis=basis, tail_offset=offset)
    kl = _kl(logp, sparse.dense_logprobs().double())
    assert kl.abs().max() < 1e-5  # float32 basis: only its rounding remains
    # Without the model the same k loses a lot more: the tail is spread uniformly.
    uniform = SparseTarget.from_logits(z, k=5).dense_logprobs(vocab_size=30)
    assert _kl(logp, uniform).mean() > 100 * kl.mean()


def test_tail_model_captures_a_low_rank_tail_that_a_uniform_one_misses():
    z = _low_rank_logits(200, 64, rank=3, seed=5)
    logp = torch.log_softmax(z, -1)
    basis, offset = fit_tail_model(logp[:100], rank=4)  # fitted on other positions
    held_out = z[100:]
    modelled = SparseTarget.from_logits(held_out, 8, tail_basis=basis, tail_offset=offset)
    uniform = SparseTarget.from_logits(held_out, 8)
    kl_model = _kl(logp[100:], modelled.dense_logprobs().double()).mean()
    kl_uniform = _kl(logp[100:], uniform.dense_logprobs(vocab_size=64)).mean()
    assert kl_model < 0.2 * kl_uniform
    # p̂ is a distribution: top-k as stored plus exactly the tail mass.
    p_hat = modelled.dense_logprobs().exp()
    torch.testing.assert_close(p_hat.sum(-1), torch.ones(100, dtype=p_hat.dtype), atol=1e-5, rtol=0)


def test_fit_is_deterministic_and_refuses_bad_ranks():
    logp = torch.log_softmax(_low_rank_logits(20, 16, 16, seed=6), -1)
    a = fit_tail_model(logp, 5)
    b = fit_tail_model(logp.clone(), 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (5, 16) and a[1].shape == (16,)
    with pytest.raises(ValueError, match="rank must be in"):
        fit_tail_model(logp, 17)
    with pytest.raises(ValueError, match=r"\(n, V\)"):
        fit_tail_model(logp[None], 2)


@pytest.mark.parametrize("chunk", [None, 3])
def test_loss_with_tail_model_is_fkl_against_the_reconstruction(chunk):
    g = torch.Generator().manual_seed(7)
    z = _low_rank_logits(24, 12, rank=3, seed=8).reshape(2, 12, 12)
    s = torch.randn(2, 12, 12, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 12, generator=g) > 0.3
    basis, offset = fit_tail_model(torch.log_softmax(z / 1.5, -1).reshape(-1, 12), rank=2)
    sparse = SparseTarget.from_logits(
        z, 4, 1.5, tail_basis=basis.double(), tail_offset=offset.double()
    )
    got = kd_loss(s, sparse, temperature=1.5, mask=mask, chunk_size=chunk)
    (g_got,) = torch.autograd.grad(got, s)
    # Reference: dense forward KL against p̂ (as logits, τ undone), through autograd.
    ref = kd_loss(s, sparse.dense_logprobs() * 1.5, temperature=1.5, mask=mask)
    (g_ref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g_got, g_ref)
    if chunk is None:  # the chunked gradient equals this one (above); one gradcheck suffices
        assert torch.autograd.gradcheck(
            lambda a: kd_loss(a, sparse, temperature=1.5, mask=mask), (s,)
        )


def test_tail_model_with_no_tail_mass_and_bad_shapes():
    z = torch.full((3, 6), -1e4, dtype=torch.float64)
    z[:, 0] = 0.0  # all mass on token 0: the tail holds nothing
    basis, offset = fit_tail_model(torch.log_softmax(_low_rank_logits(10, 6, 6, 9), -1), 3)
    sparse = SparseTarget.from_logits(z, 2, tail_basis=basis, tail_offset=offset)
    s = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    loss = kd_loss(s, sparse)
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    with pytest.raises(ValueError, match="together"):
        SparseTarget(sparse.indices, sparse.logprobs, sparse.tail_mass, 1.0, sparse.tail_coeffs)
    with pytest.raises(ValueError, match=r"must be \(V,\)"):
        SparseTarget(sparse.indices, sparse.logprobs, sparse.tail_mass, 1.0, sparse.tail_coeffs,
                     basis, offset[:3])  # fmt: skip


def test_bucket_gradient_when_the_student_tail_is_small_and_when_it_is_not():
    # Two code paths for q_tail (1 − Σ top-k, or the exact tail sum below 1e-2): both must
    # match autograd through the explicit bucketed KL.
    g = torch.Generator().manual_seed(11)
    t = torch.randn(6, 16, generator=g, dtype=torch.float64) * 2
    sparse = SparseTarget.from_logits(t, k=4)
    s = torch.randn(6, 16, generator=g, dtype=torch.float64)
    s[:3].scatter_(-1, sparse.indices[:3], 12.0)  # rows 0-2: q_tail ≈ 1e-4
    s.requires_grad_(True)
    got = kd_loss(s, sparse)
    (g_got,) = torch.autograd.grad(got, s)
    logq = torch.log_softmax(s, -1)
    rest = torch.ones_like(s, dtype=torch.bool).scatter_(-1, sparse.indices, False)
    p_k = sparse.logprobs.exp()
    log_q_tail = torch.logsumexp(logq.masked_fill(~rest, float("-inf")), -1)
    ref = (p_k * (sparse.logprobs - logq.gather(-1, sparse.indices))).sum(-1)
    ref = ref + sparse.tail_mass * (sparse.tail_mass.log() - log_q_tail)
    ref = ref.mean()
    (g_ref,) = torch.autograd.grad(ref, s)
    q_tail = log_q_tail.detach().exp()
    assert float(q_tail[:3].max()) < 1e-2 < float(q_tail[3:].min())
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g_got, g_ref)
