"""Divergences against a plain float64 reference, and their invariants."""

from __future__ import annotations

import math

import pytest
import torch

from deltakd.losses import DIVERGENCES, kd_loss, per_position_divergence


def reference(student, target, name, tau, beta):
    """Textbook formulas in float64 with explicit probabilities (docs/ARCHITECTURE.md §1)."""
    p = torch.softmax(target.double() / tau, -1)
    q = torch.softmax(student.double() / tau, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "jsd":
        if beta == 0:
            return kl(p, q)
        if beta == 1:
            return kl(q, p)
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "skl":
        return kl(p, beta * p + (1 - beta) * q)
    if name == "srkl":
        return kl(q, (1 - beta) * p + beta * q)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(name)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("tau,beta", [(1.0, 0.5), (2.0, 0.1), (0.7, 0.9)])
def test_matches_float64_reference_with_mask(name, tau, beta):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 7, 13, generator=g) * 3
    t = torch.randn(3, 7, 13, generator=g) * 3
    mask = torch.rand(3, 7, generator=g) > 0.4
    ref = reference(s, t, name, tau, beta)[mask].mean()
    got = kd_loss(s, t, divergence=name, temperature=tau, beta=beta, mask=mask)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_of_a_distribution_with_itself_is_zero(name):
    z = torch.randn(5, 17, dtype=torch.float64)
    assert per_position_divergence(z, z, name).abs().max().item() < 1e-12
    # Shifting logits by a constant leaves the distribution unchanged.
    assert per_position_divergence(z + 3.0, z, name).abs().max().item() < 1e-12


@pytest.mark.parametrize("name", DIVERGENCES)
def test_nonnegative_and_positive_for_different_distributions(name):
    s, t = torch.randn(2, 50, 9, dtype=torch.float64).unbind(0)
    d = per_position_divergence(s, t, name, beta=0.3)
    assert (d > 0).all()


def test_jsd_is_symmetric_at_half_and_limits_match_tr_l():
    s, t = torch.randn(2, 20, 11, dtype=torch.float64).unbind(0)
    a = per_position_divergence(s, t, "jsd", beta=0.5)
    b = per_position_divergence(t, s, "jsd", beta=0.5)
    torch.testing.assert_close(a, b)
    assert (a <= math.log(2) + 1e-12).all()  # JSD is bounded by log 2
    torch.testing.assert_close(
        per_position_divergence(s, t, "jsd", beta=0.0), per_position_divergence(s, t, "fkl")
    )
    torch.testing.assert_close(
        per_position_divergence(s, t, "jsd", beta=1.0), per_position_divergence(s, t, "rkl")
    )


def test_skew_kl_limits():
    s, t = torch.randn(2, 20, 11, dtype=torch.float64).unbind(0)
    fkl = per_position_divergence(s, t, "fkl")
    rkl = per_position_divergence(s, t, "rkl")
    torch.testing.assert_close(per_position_divergence(s, t, "skl", beta=0.0), fkl)
    torch.testing.assert_close(per_position_divergence(s, t, "srkl", beta=0.0), rkl)
    assert per_position_divergence(s, t, "skl", beta=1.0).abs().max() < 1e-12


@pytest.mark.parametrize("name", DIVERGENCES)
def test_gradcheck_float64(name):
    s = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, False, True, True])

    def f(a, b):
        return kd_loss(a, b, divergence=name, temperature=1.3, beta=0.3, mask=mask)

    assert torch.autograd.gradcheck(f, (s, t))


@pytest.mark.parametrize("name", DIVERGENCES)
def test_extreme_logits_stay_finite(name):
    s = torch.tensor([[1e4, -1e4, 0.0, 5e3], [-1e4, -1e4, 1e4, 1e4]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0, -5e3], [1e4, -1e4, 0.0, 1e4]])
    loss = kd_loss(s, t, divergence=name, beta=0.3)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", ["fkl", "jsd", "skl", "srkl", "tvd"])
@pytest.mark.parametrize("chunk_size", [None, 1])
def test_minus_inf_target_entries_give_finite_value_and_gradient(name, chunk_size):
    s = torch.randn(3, 8, requires_grad=True)
    t = torch.randn(3, 8)
    t[:, :3] = float("-inf")  # tokens the target forbids
    loss = kd_loss(s, t, divergence=name, beta=0.3, chunk_size=chunk_size)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(s.grad).all()
    # Against the reference restricted to where the target has mass (0·log 0 = 0).
    if name == "fkl":
        p = torch.softmax(t.double(), -1)
        logq = torch.log_softmax(s.detach().double(), -1)
        keep = p > 0
        ref = (p[keep] * (p[keep].log() - logq[keep])).sum() / 3
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_rkl_against_a_forbidden_token_is_infinite_not_nan():
    s = torch.zeros(1, 4)
    t = torch.tensor([[0.0, 0.0, 0.0, float("-inf")]])
    assert kd_loss(s, t, divergence="rkl").item() == float("inf")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_float32(dtype):
    s = torch.randn(4, 9)
    t = torch.randn(4, 9)
    lo = kd_loss(s.to(dtype), t.to(dtype))
    hi = kd_loss(s.to(dtype).float(), t.to(dtype).float())
    assert lo.dtype == torch.float32
    assert lo.item() == pytest.approx(hi.item(), rel=1e-6)


def test_temperature_softens_both_distributions():
    s, t = torch.randn(2, 30, 10).unbind(0)
    hot = kd_loss(s, t, temperature=4.0)
    cold = kd_loss(s, t, temperature=1.0)
    assert hot < cold  # both flatten toward uniform as τ grows
