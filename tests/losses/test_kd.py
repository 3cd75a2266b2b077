"""kd_loss / delta_kd_loss: reductions, masks, chunking, targets and bad input."""

from __future__ import annotations

import pytest
import torch

from deltakd.losses import (
    DIVERGENCES,
    PARALLELOGRAM_VARIANTS,
    delta_kd_loss,
    delta_target,
    kd_loss,
    parallelogram_loss,
    parallelogram_target,
)


def logits(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [1, 3, 5, 64])
def test_chunked_equals_unchunked_value_and_gradient(name, chunk_size):
    s = logits(2, 5, 11, seed=1, dtype=torch.float64).requires_grad_()
    t = logits(2, 5, 11, seed=2, dtype=torch.float64).requires_grad_()
    mask = logits(2, 5, seed=3) > 0
    kw = dict(divergence=name, temperature=1.5, beta=0.3, mask=mask)
    full = kd_loss(s, t, **kw)
    g_full = torch.autograd.grad(full, (s, t))
    chunked = kd_loss(s, t, chunk_size=chunk_size, **kw)
    g_chunked = torch.autograd.grad(chunked, (s, t))
    torch.testing.assert_close(chunked, full)
    for a, b in zip(g_chunked, g_full):
        torch.testing.assert_close(a, b)


def test_chunked_gradcheck_and_scaled_backward():
    s = logits(6, 7, seed=4, dtype=torch.float64).requires_grad_()
    t = logits(6, 7, seed=5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: kd_loss(a, t, chunk_size=4), (s,))
    # A scaled loss (λ-weighting in the trainer) scales the gradient.
    (3.0 * kd_loss(s, t, chunk_size=2)).backward()
    expected = torch.autograd.grad(3.0 * kd_loss(s, t), s)[0]
    torch.testing.assert_close(s.grad, expected)


def test_repeated_backward_with_different_scales_stays_correct():
    s = logits(4, 5, seed=6).requires_grad_()
    t = logits(4, 5, seed=7)
    loss = kd_loss(s, t, chunk_size=2)
    (g_ref,) = torch.autograd.grad(kd_loss(s, t), s)
    for scale in (2.0, 0.5, 0.0, 3.0):
        (g,) = torch.autograd.grad(loss, s, torch.tensor(scale), retain_graph=True)
        torch.testing.assert_close(g, scale * g_ref)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_nothing_counted_gives_zero_and_zero_gradient(name, chunk_size):
    s = logits(2, 3, 6).requires_grad_()
    t = logits(2, 3, 6, seed=1)
    loss = kd_loss(
        s, t, divergence=name, mask=torch.zeros(2, 3, dtype=torch.bool), chunk_size=chunk_size
    )
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_masked_positions_get_no_gradient_and_nan_there_is_ignored():
    s = logits(4, 6).requires_grad_()
    t = logits(4, 6, seed=1)
    t[1] = float("nan")  # padding garbage in an uncounted position
    mask = torch.tensor([True, False, True, True])
    for chunk in (None, 2):
        s.grad = None
        loss = kd_loss(s, t, mask=mask, chunk_size=chunk)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.equal(s.grad[1], torch.zeros(6))


def test_sum_reduction_is_mean_times_count():
    s, t = logits(3, 4, 8), logits(3, 4, 8, seed=1)
    mask = logits(3, 4, seed=2) > 0
    n = int(mask.sum())
    mean = kd_loss(s, t, mask=mask)
    total = kd_loss(s, t, mask=mask, reduction="sum")
    assert total.item() == pytest.approx(mean.item() * n, rel=1e-6)


def test_delta_target_alpha_zero_is_teacher_and_alpha_one_is_parallelogram():
    tft, traw, sraw = logits(3, 9, seed=1), logits(3, 9, seed=2), logits(3, 9, seed=3)
    torch.testing.assert_close(delta_target(tft, traw, sraw, alpha=0.0), tft)
    torch.testing.assert_close(delta_target(tft, traw, sraw, alpha=1.0), sraw + (tft - traw))
    # α = 0: the target distribution equals the finetuned teacher's.
    p = torch.softmax(delta_target(tft, traw, sraw, alpha=0.0), -1)
    torch.testing.assert_close(p, torch.softmax(tft, -1))


def test_delta_target_matches_product_of_distributions():
    # π* ∝ π_tft · (π_sraw / π_traw)^α: normalisers cancel inside the softmax.
    tft, traw, sraw = (logits(4, 7, seed=i, dtype=torch.float64) for i in (1, 2, 3))
    alpha = 0.6
    pt, pr, ps = (torch.softmax(z, -1) for z in (tft, traw, sraw))
    unnorm = pt * (ps / pr) ** alpha
    expected = unnorm / unnorm.sum(-1, keepdim=True)
    torch.testing.assert_close(torch.softmax(delta_target(tft, traw, sraw, alpha), -1), expected)


def test_delta_target_has_no_gradient():
    tft = logits(2, 5).requires_grad_()
    z = delta_target(tft, logits(2, 5, seed=1), logits(2, 5, seed=2))
    assert not z.requires_grad


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_delta_kd_loss_equals_kd_loss_on_delta_target(name, chunk_size):
    s = logits(2, 4, 10, seed=0).requires_grad_()
    tft, traw, sraw = (logits(2, 4, 10, seed=i) for i in (1, 2, 3))
    mask = logits(2, 4, seed=4) > -0.5
    kw = dict(divergence=name, temperature=2.0, beta=0.2, mask=mask)
    a = delta_kd_loss(s, tft, traw, sraw, alpha=0.7, chunk_size=chunk_size, **kw)
    (ga,) = torch.autograd.grad(a, s)
    b = kd_loss(s, delta_target(tft, traw, sraw, alpha=0.7), **kw)
    (gb,) = torch.autograd.grad(b, s)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


def test_delta_kd_loss_accepts_bf16_references():
    s = logits(3, 6).requires_grad_()
    refs = [logits(3, 6, seed=i).bfloat16() for i in (1, 2, 3)]
    loss = delta_kd_loss(s, *refs, chunk_size=2)
    ref = kd_loss(s, delta_target(*[r.float() for r in refs]))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("variant", sorted(PARALLELOGRAM_VARIANTS))
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_every_variant_matches_its_explicit_target(variant, chunk_size):
    v = PARALLELOGRAM_VARIANTS[variant]
    refs = {r: logits(5, 8, seed=i, dtype=torch.float64) for i, r in enumerate(v.roles, 1)}
    s = logits(5, 8, seed=9, dtype=torch.float64).requires_grad_()
    loss = parallelogram_loss(s, refs, variant=variant, alpha=0.5, chunk_size=chunk_size)
    (g,) = torch.autograd.grad(loss, s)
    # Explicit: build the target with autograd (gradient through the live student if any).
    s2 = s.detach().clone().requires_grad_()
    target = parallelogram_target(variant, s2, refs, alpha=0.5)
    assert target.requires_grad == v.has_live_gradient
    expected = kd_loss(s2, target, divergence=v.default_divergence)
    (g2,) = torch.autograd.grad(expected, s2)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(g, g2)


def test_delta_variant_is_delta_kd():
    refs = {
        r: logits(3, 5, seed=i)
        for i, r in enumerate(("teacher_ft", "teacher_raw", "student_raw"), 1)
    }
    s = logits(3, 5, seed=8)
    a = parallelogram_loss(s, refs, variant="delta", alpha=0.4)
    b = delta_kd_loss(s, refs["teacher_ft"], refs["teacher_raw"], refs["student_raw"], alpha=0.4)
    torch.testing.assert_close(a, b)


def test_live_gradient_variant_gradient_differs_from_stop_gradient():
    refs = {r: logits(4, 6, seed=i) for i, r in enumerate(("teacher_ft", "teacher_raw"), 1)}
    s = logits(4, 6, seed=7).requires_grad_()
    (g_live,) = torch.autograd.grad(parallelogram_loss(s, refs, variant="live_shift"), s)
    (g_sg,) = torch.autograd.grad(parallelogram_loss(s, refs, variant="live_shift_sg"), s)
    assert not torch.allclose(g_live, g_sg)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s, t: kd_loss(s, t[..., :-1]), "different shapes"),
        (lambda s, t: kd_loss(s, t, divergence="kl"), "unknown divergence 'kl'.*fkl"),
        (lambda s, t: kd_loss(s, t, temperature=0.0), "temperature must be"),
        (lambda s, t: kd_loss(s, t, beta=1.5), "beta must be in"),
        (lambda s, t: kd_loss(s, t, chunk_size=0), "chunk_size must be"),
        (lambda s, t: kd_loss(s, t, mask=torch.ones(2, 3)), "mask must be a bool"),
        (lambda s, t: kd_loss(s, t, mask=torch.ones(3, 2, dtype=torch.bool)), "mask shape"),
        (lambda s, t: kd_loss(s, t, reduction="none"), "reduction must be"),
        (lambda s, t: parallelogram_loss(s, {}, variant="nope"), "unknown parallelogram"),
        (lambda s, t: parallelogram_loss(s, {"teacher_ft": t}), "needs the 'student_raw'"),
    ],
)
def test_bad_input_gets_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(logits(2, 3, 7), logits(2, 3, 7, seed=1))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(4, 5, 6),
        lambda: torch.randn(4, 6, 8)[:, :-1, :6],  # the trainer's logits[:, :-1, :V]
        lambda: torch.randn(4, 6, 8)[:, :, :6],
        lambda: torch.randn(4, 6, 8)[:, :-1],
        lambda: torch.randn(1, 6, 8)[:, :-1],
        lambda: torch.randn(4, 6, 8).transpose(0, 1),
        lambda: torch.randn(4, 6, 8)[::2],
    ],
)
def test_flat_view_is_taken_exactly_when_view_works(make):
    from deltakd.losses.kd import _flat

    x = make()
    lead = x.shape[:-1]
    try:
        want = x.view(lead.numel(), x.shape[-1])
    except RuntimeError:
        want = None
    got = _flat(x, lead)
    assert (got is None) == (want is None)
    if got is not None:
        assert got.data_ptr() == x.data_ptr() and torch.equal(got, want)
