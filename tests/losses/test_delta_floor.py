"""Robust Delta-KD (`floor`): the raw models' log-probabilities at τ are floored before they are
differenced. Checked against a float64 reference written from the formula, and the dense,
chunked and fused paths against each other (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from deltakd.losses import (
    PARALLELOGRAM_VARIANTS,
    delta_kd_loss,
    delta_target,
    parallelogram_loss,
    parallelogram_target,
)
from deltakd.losses.fused import fused_distill_loss
from deltakd.losses.targets import floor_logprobs

F64 = torch.float64
N, H, V = 9, 6, 40
ROLES = ("teacher_ft", "teacher_ft2", "teacher_raw", "student_raw")
FLOOR = -5.0


def randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def world(scale: float = 2.5):
    """Student (hidden, head) needing grads and (hidden, head) of every frozen role, scaled so
    that the raw models put many tokens below FLOOR (the floor bites)."""
    hs = randn(N, H, seed=1).requires_grad_()
    ws = randn(V, H, seed=2).requires_grad_()
    refs = {r: (randn(N, H, seed=10 + i), randn(V, H, seed=20 + i, scale=scale))
            for i, r in enumerate(ROLES)}  # fmt: skip
    return hs, ws, refs


def dense(refs):
    return {r: h @ w.T for r, (h, w) in refs.items()}  # (N, V)


def reference_fkl(zs, z, alpha, floor, tau):
    """Mean forward KL(π* ‖ q) from the formula, float64:
    log π* = log_softmax(log π_ft + α·(max(log π_sraw, f) − max(log π_traw, f))), all at τ."""

    def logp(x):
        return torch.log_softmax(x / tau, dim=-1)

    shift = logp(z["student_raw"]).clamp(min=floor) - logp(z["teacher_raw"]).clamp(min=floor)
    log_target = torch.log_softmax(logp(z["teacher_ft"]) + alpha * shift, dim=-1)
    return (log_target.exp() * (log_target - logp(zs))).sum(-1).mean()


def grads(loss, *xs):
    return torch.autograd.grad(loss, xs, retain_graph=True)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_floored_loss_matches_the_float64_formula(tau):
    hs, ws, refs = world()
    z = dense(refs)
    zs = hs @ ws.T
    low = torch.log_softmax(z["teacher_raw"] / tau, -1) < FLOOR
    assert low.float().mean() > 0.1  # the floor bites on this world
    got = delta_kd_loss(zs, z["teacher_ft"], z["teacher_raw"], z["student_raw"], alpha=0.8,
                        temperature=tau, floor=FLOOR)  # fmt: skip
    want = reference_fkl(zs, z, 0.8, FLOOR, tau)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    plain = delta_kd_loss(zs, z["teacher_ft"], z["teacher_raw"], z["student_raw"], alpha=0.8,
                          temperature=tau)  # fmt: skip
    assert abs(float((plain - got).detach())) > 1e-3  # and it is not plain Delta-KD
    # The target itself: softmax(z*/τ) equals the formula's π*.
    z_star = delta_target(z["teacher_ft"], z["teacher_raw"], z["student_raw"], 0.8,
                          floor=FLOOR, temperature=tau)  # fmt: skip
    logp = [torch.log_softmax(z[r] / tau, -1) for r in ("teacher_ft", "student_raw", "teacher_raw")]
    want_t = torch.log_softmax(logp[0] + 0.8 * (logp[1].clamp(min=FLOOR) - logp[2].clamp(min=FLOOR)), -1)  # fmt: skip
    torch.testing.assert_close(torch.log_softmax(z_star / tau, -1), want_t.detach())


def test_where_both_raw_models_are_below_the_floor_the_target_follows_the_finetuned_teacher():
    _, _, refs = world(scale=4.0)
    z = dense(refs)
    z_star = delta_target(z["teacher_ft"], z["teacher_raw"], z["student_raw"], 1.0, floor=FLOOR)
    both = (torch.log_softmax(z["teacher_raw"], -1) < FLOOR) & (
        torch.log_softmax(z["student_raw"], -1) < FLOOR
    )
    rows = both.sum(-1) >= 2
    assert rows.any()
    # log π*(v) − log π_ft(v) is one constant per position over those tokens: ratio 1.
    diff = torch.log_softmax(z_star, -1) - torch.log_softmax(z["teacher_ft"], -1)
    for i in rows.nonzero().flatten():
        d = diff[i][both[i]]
        torch.testing.assert_close(d, d[:1].expand_as(d))


@pytest.mark.parametrize("path", ["dense", "chunked", "fused"])
@pytest.mark.parametrize("variant", ["delta", "multi_teacher"])
def test_minus_infinity_floor_is_plain_delta_kd(path, variant):
    hs, ws, refs = world()
    z = dense(refs)
    kw = dict(variant=variant, alpha=0.7, temperature=1.5)
    if path == "fused":
        plain = fused_distill_loss(hs, ws, refs, **kw)
        floored = fused_distill_loss(hs, ws, refs, delta_floor=-math.inf, **kw)
    else:
        chunk = 2 if path == "chunked" else None
        plain = parallelogram_loss(hs @ ws.T, z, chunk_size=chunk, **kw)
        floored = parallelogram_loss(hs @ ws.T, z, chunk_size=chunk, floor=-math.inf, **kw)
    torch.testing.assert_close(floored, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(floored, hs, ws), grads(plain, hs, ws)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("variant", "divergence"),
    [("delta", "fkl"), ("delta", "rkl"), ("delta", "jsd"), ("delta_rkl", None),
     ("multi_teacher", "fkl")],
)  # fmt: skip
def test_dense_chunked_and_fused_agree_with_the_floor(variant, divergence):
    hs, ws, refs = world()
    z = dense(refs)
    mask = randn(N, seed=5) > -0.5
    kw = dict(variant=variant, alpha=1.3, temperature=1.7, divergence=divergence, mask=mask,
              floor=FLOOR)  # fmt: skip
    d = parallelogram_loss(hs @ ws.T, z, **kw)
    c = parallelogram_loss(hs @ ws.T, z, chunk_size=3, **kw)
    fkw = {k: v for k, v in kw.items() if k != "floor"}
    # Fused from hidden states (the references too), and from dense reference logits.
    f_lin = fused_distill_loss(hs, ws, refs, chunk_size=4, delta_floor=FLOOR, **fkw)
    f_dense = fused_distill_loss(hs, ws, z, chunk_size=4, softmax_chunk_size=3,
                                 delta_floor=FLOOR, **fkw)  # fmt: skip
    want = grads(d, hs, ws)
    for other in (c, f_lin, f_dense):
        torch.testing.assert_close(other, d)
        for a, b in zip(grads(other, hs, ws), want):
            torch.testing.assert_close(a, b)


def test_fused_floor_on_a_soft_capped_head_and_as_a_first_term():
    from deltakd.losses.fused import _Floored
    from deltakd.losses.heads import LogitHead

    hs, ws, refs = world()
    # A raw role with a soft-capped head, so its logits are built through the capped branch.
    h_raw, w_raw = refs["teacher_raw"]
    capped = LogitHead(w_raw, None, scale=0.9, softcap=6.0)
    refs_c = {**refs, "teacher_raw": (h_raw, capped)}
    z = dense(refs)
    z["teacher_raw"] = 6.0 * torch.tanh(0.9 * z["teacher_raw"] / 6.0)
    got = fused_distill_loss(hs, ws, refs_c, alpha=0.9, delta_floor=FLOOR, chunk_size=5)
    want = parallelogram_loss(hs @ ws.T, z, alpha=0.9, floor=FLOOR)
    torch.testing.assert_close(got, want)
    # floor_logprobs is τ·max(log_softmax(z/τ), f)...
    x = randn(3, V, seed=9, scale=4.0)
    want_x = (2.0 * torch.log_softmax(x / 2.0, -1)).clamp(min=2.0 * FLOOR)
    torch.testing.assert_close(floor_logprobs(x, FLOOR, 2.0), want_x)
    # ...and a floored term that opens the target (written into the target buffer itself; no
    # shipped variant puts a raw role first) is weight · that.
    out = torch.empty(2, V, dtype=F64)
    _Floored(x, FLOOR, 2.0).logits_into(out, torch.tensor([0, 2]), 0.5, True, None)
    torch.testing.assert_close(out, 0.5 * want_x[[0, 2]])


def test_parallelogram_target_with_the_floor_equals_delta_target():
    _, _, refs = world()
    z = dense(refs)
    got = parallelogram_target("delta", None, z, alpha=0.6, floor=FLOOR, temperature=1.3)  # type: ignore[arg-type]
    want = delta_target(z["teacher_ft"], z["teacher_raw"], z["student_raw"], 0.6, floor=FLOOR,
                        temperature=1.3)  # fmt: skip
    torch.testing.assert_close(got, want)


def test_the_floor_is_refused_outside_the_delta_family_and_must_be_negative():
    floorable = sorted(n for n, v in PARALLELOGRAM_VARIANTS.items() if v.floorable)
    assert floorable == ["delta", "delta_rkl", "multi_teacher"]
    hs, ws, refs = world()
    z = dense(refs)
    with pytest.raises(ValueError, match="student_anchor"):
        parallelogram_loss(hs @ ws.T, z, variant="student_anchor", floor=FLOOR)
    with pytest.raises(ValueError, match="live_shift"):
        fused_distill_loss(hs, ws, refs, variant="live_shift", delta_floor=FLOOR)
    with pytest.raises(ValueError, match="plain KD"):
        fused_distill_loss(hs, ws, refs, variant=None, delta_floor=FLOOR)
    for bad in (0.0, 2.0, float("nan")):
        with pytest.raises(ValueError, match="negative log-probability"):
            delta_target(z["teacher_ft"], z["teacher_raw"], z["student_raw"], floor=bad)
