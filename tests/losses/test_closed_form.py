"""Closed-form divergence gradients: equal to autograd, and the fallback for non-finite slices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltakd.losses import kd_loss
from deltakd.losses.closed_form import CLOSED_FORM, SliceGrad, supports
from deltakd.losses.divergences import per_position_divergence
from deltakd.losses.fused import fused_distill_loss

F64 = torch.float64


def randn(*shape, seed, scale=1.0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


CASES = [
    (div, beta, tau, labels)
    for div, beta in [
        ("fkl", 0.5),
        ("rkl", 0.5),
        ("jsd", 0.5),
        ("jsd", 0.1),
        ("jsd", 0.0),
        ("jsd", 1.0),
    ]
    for tau in (1.0, 2.0)
    for labels in (False, True)
    if not (labels and tau != 1.0)
]


@pytest.mark.parametrize("divergence,beta,tau,with_labels", CASES)
def test_value_and_gradient_equal_autograd(divergence, beta, tau, with_labels):
    s, t = randn(5, 40, seed=1, scale=3.0), randn(5, 40, seed=2, scale=3.0)
    labels = torch.tensor([1, -100, 3, 39, 0])
    sg = SliceGrad(divergence, tau, beta, 8, 40, F64, torch.device("cpu"))
    out = torch.empty_like(t)
    res = sg(s, t.clone(), out, labels if with_labels else None, -100, 0.7)
    assert res is not None
    per, ce = res

    leaf = s.clone().requires_grad_()
    ref = per_position_divergence(leaf, t, divergence, tau, beta)
    loss = ref.sum()
    if with_labels:
        ce_ref = F.cross_entropy(leaf, labels, ignore_index=-100, reduction="sum")
        loss = loss + 0.7 * ce_ref
        torch.testing.assert_close(ce, ce_ref)
    else:
        assert ce is None
    (grad,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(per, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sg.factor * out, grad, rtol=1e-10, atol=1e-12)


def test_output_may_be_the_target_buffer():
    s, t = randn(3, 30, seed=3), randn(3, 30, seed=4)
    sg = SliceGrad("jsd", 1.0, 0.5, 3, 30, F64, torch.device("cpu"))
    apart = torch.empty_like(t)
    per_a, _ = sg(s, t, apart)
    inplace = t.clone()
    per_b, _ = sg(s, inplace, inplace)
    torch.testing.assert_close(per_a, per_b)
    torch.testing.assert_close(apart, inplace)


@pytest.mark.parametrize("divergence", CLOSED_FORM)
def test_a_minus_inf_target_returns_none_and_leaves_out_untouched(divergence):
    s, t = randn(2, 10, seed=5), randn(2, 10, seed=6)
    t[1, 3] = float("-inf")  # probability 0: the closed form meets 0·∞
    sg = SliceGrad(divergence, 1.0, 0.5, 2, 10, F64, torch.device("cpu"))
    out = torch.full_like(t, 7.0)
    assert sg(s, t, out) is None
    assert bool((out == 7.0).all())


def test_supports_only_closed_form_divergences_and_labels_at_tau_one():
    assert supports("jsd", 2.0, False) and not supports("jsd", 2.0, True)
    assert supports("fkl", 1.0, True)
    assert not supports("tvd", 1.0, False) and not supports("skl", 1.0, False)


def _extreme(n, v, seed):
    """Targets with -inf entries and ±1e4 logits: the closed form fails on some slices."""
    s = randn(n, v, seed=seed, scale=4.0)
    t = randn(n, v, seed=seed + 1, scale=4.0)
    t[0, :3] = float("-inf")
    t[2, 5] = float("-inf")
    s[3, 0], s[3, 1] = 1e4, -1e4
    t[4, 2], t[4, 7] = 1e4, -1e4
    return s, t


@pytest.mark.parametrize("divergence", ["fkl", "jsd", "rkl"])
def test_chunked_kd_loss_mixes_closed_form_and_fallback_slices(divergence):
    s, t = _extreme(6, 12, seed=7)
    if divergence == "rkl":
        t[t == float("-inf")] = -50.0  # rkl is +inf there, as the math says
    leaf_a = s.clone().requires_grad_()
    a = kd_loss(leaf_a, t, divergence=divergence, chunk_size=4)
    a.backward()
    leaf_b = s.clone().requires_grad_()
    b = kd_loss(leaf_b, t, divergence=divergence)
    b.backward()
    assert torch.isfinite(a)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(leaf_a.grad, leaf_b.grad)


@pytest.mark.parametrize("divergence", ["fkl", "jsd"])
def test_fused_mixes_closed_form_and_fallback_slices(divergence):
    """Dense -inf target rows in one softmax slice, finite ones in another; λ > 0 too."""
    n, v, h = 6, 12, 5
    hs = randn(n, h, seed=8).requires_grad_()
    ws = randn(v, h, seed=9).requires_grad_()
    _, t = _extreme(n, v, seed=10)
    labels = torch.tensor([1, 2, -100, 4, 5, 6])
    kw = dict(variant=None, divergence=divergence, sft_weight=0.3, labels=labels)
    loss = fused_distill_loss(hs, ws, {"teacher_ft": t}, chunk_size=4, softmax_chunk_size=1, **kw)
    loss.backward()
    grads = (hs.grad.clone(), ws.grad.clone())
    hs.grad = ws.grad = None
    z = hs @ ws.t()
    ref = 0.7 * kd_loss(z, t, divergence=divergence) + 0.3 * F.cross_entropy(z, labels)
    ref.backward()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grads[0], hs.grad)
    torch.testing.assert_close(grads[1], ws.grad)


def test_chunked_kd_loss_on_bfloat16_logits_matches_float32():
    s, t = randn(9, 50, seed=11, scale=3.0), randn(9, 50, seed=12, scale=3.0)
    s16, t16 = s.to(torch.bfloat16), t.to(torch.bfloat16)
    leaf = s16.clone().requires_grad_()
    loss = kd_loss(leaf, t16, divergence="jsd", chunk_size=4)
    loss.backward()
    leaf32 = s16.float().requires_grad_()
    ref = kd_loss(leaf32, t16.float(), divergence="jsd")
    ref.backward()
    assert leaf.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(leaf.grad.float(), leaf32.grad, rtol=1e-2, atol=1e-4)
