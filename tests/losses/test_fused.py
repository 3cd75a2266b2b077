"""fused_distill_loss: same value and gradients as the unfused losses, bounded memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from deltakd.losses import (
    DIVERGENCES,
    PARALLELOGRAM_VARIANTS,
    SparseTarget,
    delta_kd_loss,
    fit_tail_model,
    kd_loss,
    parallelogram_loss,
)
from deltakd.losses.fused import fused_distill_loss
from deltakd.losses.heads import LogitHead

N, H, V = 7, 5, 11
F64 = torch.float64
ROLES = ("teacher_ft", "teacher_ft2", "teacher_raw", "student_raw")


def randn(*shape, seed, dtype=F64, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def world(n=N, h=H, v=V, pad=0, dtype=F64, lead=None, bias=False):
    """Student (hidden, head[, bias]) needing grads, and (hidden, head) of every frozen role."""
    lead = (n,) if lead is None else lead
    hs = randn(*lead, h, seed=1, dtype=dtype).requires_grad_()
    ws = randn(v + pad, h, seed=2, dtype=dtype).requires_grad_()
    bs = randn(v + pad, seed=3, dtype=dtype).requires_grad_() if bias else None
    refs = {
        r: (randn(*lead, h, seed=10 + i, dtype=dtype), randn(v + pad, h, seed=20 + i, dtype=dtype))
        for i, r in enumerate(ROLES)
    }
    return hs, ws, bs, refs


def logits_of(hidden, head, v=None, bias=None):
    v = head.shape[0] if v is None else v
    z = hidden @ head[:v].T  # (..., V)
    return z if bias is None else z + bias[:v]


def unfused(hs, ws, bs, refs, v=None, **kw):
    dense = {r: logits_of(h, w, v) for r, (h, w) in refs.items()}
    return parallelogram_loss(logits_of(hs, ws, v, bias=bs), dense, **kw)


def grads(loss, *xs):
    return torch.autograd.grad(loss, [x for x in xs if x is not None], retain_graph=True)


def assert_same(fused, ref, xs):
    torch.testing.assert_close(fused, ref)
    for a, b in zip(grads(fused, *xs), grads(ref, *xs)):
        torch.testing.assert_close(a, b)


# Every divergence on a frozen target, a live one (gradient through the target) and a
# stop-gradient one; every catalogue variant with its default divergence.
@pytest.mark.parametrize(
    ("variant", "divergence"),
    [(v, d) for v in ("delta", "live_anchor", "live_shift_sg") for d in DIVERGENCES]
    + [(v, None) for v in sorted(PARALLELOGRAM_VARIANTS)],
)
def test_every_variant_and_divergence_matches_unfused(variant, divergence):
    hs, ws, bs, refs = world(bias=True)
    mask = randn(N, seed=5) > -0.5
    kw = dict(variant=variant, divergence=divergence, alpha=0.7, temperature=1.3, beta=0.3)
    # Chunk and softmax-slice sizes that do not divide the counted rows.
    for m, chunk, rows in ((None, 5, 2), (mask, 2, None)):
        ref = unfused(hs, ws, bs, refs, mask=m, **kw)
        fused = fused_distill_loss(
            hs, ws, refs, student_bias=bs, mask=m, chunk_size=chunk, softmax_chunk_size=rows, **kw
        )
        assert_same(fused, ref, (hs, ws, bs))


@pytest.mark.parametrize("kind", ["dense", "hidden", "mixed"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dense_hidden_and_mixed_refs_match_delta_kd_loss(kind, reduction):
    hs, ws, _, refs = world(lead=(2, 4))
    dense = {r: logits_of(h, w) for r, (h, w) in refs.items()}
    given = {
        "dense": dense,
        "hidden": refs,
        "mixed": {
            "teacher_ft": refs["teacher_ft"],
            "teacher_raw": dense["teacher_raw"],
            "student_raw": refs["student_raw"],
        },
    }[kind]
    mask = torch.tensor([[True, False, True, True], [False, True, True, False]])
    ref = delta_kd_loss(
        logits_of(hs, ws),
        dense["teacher_ft"],
        dense["teacher_raw"],
        dense["student_raw"],
        alpha=0.5,
        divergence="jsd",
        mask=mask,
        reduction=reduction,
    )
    fused = fused_distill_loss(
        hs, ws, given, alpha=0.5, divergence="jsd", mask=mask, chunk_size=3, reduction=reduction
    )
    assert_same(fused, ref, (hs, ws))
    (g_h,) = grads(fused_distill_loss(hs, ws, given, mask=mask), hs)
    assert g_h.shape == hs.shape  # leading shape kept
    assert torch.equal(g_h[~mask], torch.zeros_like(g_h[~mask]))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_plain_kd_against_one_role_matches_kd_loss(divergence):
    hs, ws, _, refs = world()
    target = logits_of(*refs["teacher_ft"])
    ref = kd_loss(logits_of(hs, ws), target, divergence=divergence, temperature=2.0)
    for given in (refs["teacher_ft"], target):
        fused = fused_distill_loss(
            hs,
            ws,
            {"teacher_ft": given},
            variant=None,
            divergence=divergence,
            temperature=2.0,
            chunk_size=4,
        )
        assert_same(fused, ref, (hs, ws))


def test_sparse_target_matches_kd_loss_and_needs_plain_kd():
    hs, ws, _, refs = world()
    sparse = SparseTarget.from_logits(logits_of(*refs["teacher_ft"]), k=4, temperature=1.5)
    mask = randn(N, seed=6) > 0
    ref = kd_loss(logits_of(hs, ws), sparse, temperature=1.5, mask=mask)
    fused = fused_distill_loss(
        hs,
        ws,
        {"cache": sparse},
        variant=None,
        target_role="cache",
        temperature=1.5,
        mask=mask,
        chunk_size=3,
        softmax_chunk_size=2,
    )
    assert_same(fused, ref, (hs, ws))
    with pytest.raises(ValueError, match=r"whole target distribution.*variant=None"):
        fused_distill_loss(hs, ws, {**refs, "teacher_ft": sparse}, temperature=1.5)
    with pytest.raises(ValueError, match="'fkl' only"):
        fused_distill_loss(hs, ws, {"t": sparse}, variant=None, target_role="t", divergence="rkl")


def test_live_student_gradient_sums_both_paths():
    # live_anchor: z* = z_s + α·(z_ft − z_raw) with gradient through z_s inside the target.
    hs, ws, _, refs = world()
    live = fused_distill_loss(hs, ws, refs, variant="live_anchor", divergence="rkl", chunk_size=3)
    sg = fused_distill_loss(hs, ws, refs, variant="live_anchor_sg", divergence="rkl", chunk_size=3)
    torch.testing.assert_close(live, sg)  # same value ...
    g_live, g_sg = grads(live, ws)[0], grads(sg, ws)[0]
    # ... but the live gradient = student path (the sg gradient) + path through the target.
    zs = logits_of(hs, ws)
    dense = {r: logits_of(h, w) for r, (h, w) in refs.items()}
    target = zs + dense["teacher_ft"] - dense["teacher_raw"]
    from deltakd.losses import per_position_divergence

    through_target = grads(per_position_divergence(zs.detach(), target, "rkl").mean(), ws)[0]
    torch.testing.assert_close(g_live, g_sg + through_target)
    assert not torch.allclose(g_live, g_sg)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_nothing_counted_gives_zero_with_zero_gradients(divergence):
    hs, ws, bs, refs = world(bias=True)
    loss = fused_distill_loss(
        hs,
        ws,
        refs,
        student_bias=bs,
        divergence=divergence,
        mask=torch.zeros(N, dtype=torch.bool),
        sft_weight=0.5,
        labels=torch.zeros(N).long(),
    )
    loss.backward()
    assert loss.item() == 0.0
    for x in (hs, ws, bs):
        assert torch.equal(x.grad, torch.zeros_like(x))


def test_sft_term_in_the_same_pass():
    hs, ws, _, refs = world()
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    labels[2] = -100
    mask = torch.ones(N, dtype=torch.bool)
    mask[5] = False
    lam = 0.3
    zs = logits_of(hs, ws)
    kd = unfused(hs, ws, None, refs, mask=mask)
    keep = mask & (labels != -100)
    ce = F.cross_entropy(zs[keep], labels[keep])
    fused, parts = fused_distill_loss(
        hs,
        ws,
        refs,
        mask=mask,
        sft_weight=lam,
        labels=labels,
        chunk_size=4,
        softmax_chunk_size=3,
        return_components=True,
    )
    assert_same(fused, lam * ce + (1 - lam) * kd, (hs, ws))
    torch.testing.assert_close(parts["kd"], kd.detach())
    torch.testing.assert_close(parts["sft"], ce.detach())
    with pytest.raises(ValueError, match="needs labels"):
        fused_distill_loss(hs, ws, refs, sft_weight=0.5)


def test_padded_vocab_rows_are_sliced_and_get_zero_gradient():
    hs, ws, bs, refs = world(pad=3, bias=True)
    dense_padded = {r: h @ w.T for r, (h, w) in refs.items()}  # (N, V + 3), padding columns
    ref = unfused(hs, ws, bs, refs, v=V)
    for given in (refs, dense_padded):
        fused = fused_distill_loss(hs, ws, given, student_bias=bs, vocab_size=V, chunk_size=3)
        assert_same(fused, ref, (hs, ws, bs))
    fused = fused_distill_loss(hs, ws, refs, student_bias=bs, vocab_size=V)
    g_w, g_b = grads(fused, ws, bs)
    assert g_w.shape == ws.shape and torch.equal(g_w[V:], torch.zeros_like(g_w[V:]))
    assert torch.equal(g_b[V:], torch.zeros_like(g_b[V:]))
    with pytest.raises(ValueError, match="share one tokenizer"):
        fused_distill_loss(hs, ws, refs, vocab_size=V + 4)


def test_gradcheck_tiny_live_variant():
    hs, ws, bs, refs = world(n=3, h=2, v=4, bias=True)
    mask = torch.tensor([True, False, True])

    def f(h, w, b):
        return fused_distill_loss(
            h,
            w,
            refs,
            student_bias=b,
            variant="live_shift",
            divergence="jsd",
            mask=mask,
            chunk_size=1,
            sft_weight=0.2,
            labels=torch.tensor([1, 0, 3]),
        )

    assert torch.autograd.gradcheck(f, (hs, ws, bs))


def test_scaled_and_repeated_backward():
    hs, ws, _, refs = world()
    loss = fused_distill_loss(hs, ws, refs, chunk_size=2)
    (g_ref,) = grads(unfused(hs, ws, None, refs), ws)
    for scale in (2.0, 0.5, 0.0, 3.0):
        (g,) = torch.autograd.grad(loss, ws, torch.tensor(scale, dtype=F64), retain_graph=True)
        torch.testing.assert_close(g, scale * g_ref)
    ws.grad = None
    (3.0 * fused_distill_loss(hs, ws, refs)).backward()
    torch.testing.assert_close(ws.grad, 3.0 * g_ref)


def wide(refs):
    """The roles' 16-bit hidden states and heads upcast: their products then stay float32."""
    return {r: (h.float(), w.float()) for r, (h, w) in refs.items()}


def test_bfloat16_inputs_compute_in_float32():
    hs, ws, _, refs = world(dtype=torch.bfloat16, n=16, v=32, h=8)
    refs = {r: (h, w) for r, (h, w) in refs.items()}
    loss = fused_distill_loss(hs, ws, refs, chunk_size=5)
    assert loss.dtype == torch.float32
    g_h, g_w = grads(loss, hs, ws)
    assert g_h.dtype == torch.bfloat16 and g_w.dtype == torch.bfloat16
    # The unfused path on the float32 products of the bf16 inputs (the default).
    ref = unfused(hs.float(), ws.float(), None, wide(refs))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip((g_h, g_w), grads(ref, hs, ws)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_bfloat16_logits_as_the_models_emit_them_are_still_selectable():
    hs, ws, _, refs = world(dtype=torch.bfloat16, n=16, v=32, h=8)
    refs = {r: (h, w) for r, (h, w) in refs.items()}
    loss = fused_distill_loss(hs, ws, refs, chunk_size=5, float32_logits=False)
    # The unfused path on the bf16 logits the models themselves would emit.
    ref = unfused(hs, ws, None, refs)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads(loss, hs, ws), grads(ref, hs, ws)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)
    default = fused_distill_loss(hs, ws, refs, chunk_size=5)
    assert (
        abs(float(default.detach()) - float(loss.detach())) > 1e-4
    )  # the rounding the default avoids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_with_a_mask_match_the_unfused_loss(dtype):
    # Issue 19: a mask that leaves positions out sends the gradient rows through index_copy_
    # into the float32 buffer; the 16-bit chunk gradient used to crash it.
    hs, ws, _, refs = world(dtype=dtype, n=16, v=32, h=8)
    refs = {r: (h, w) for r, (h, w) in refs.items()}
    mask = torch.ones(16, dtype=torch.bool)
    mask[[2, 7, 8]] = False
    loss = fused_distill_loss(hs, ws, refs, mask=mask, chunk_size=5)
    g_h, g_w = grads(loss, hs, ws)
    assert g_h.dtype == dtype and g_w.dtype == dtype
    assert not bool(g_h[~mask].any())  # uncounted positions get no gradient
    ref = unfused(hs.float(), ws.float(), None, wide(refs), mask=mask)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip((g_h, g_w), grads(ref, hs, ws)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_no_grad_and_frozen_inputs():
    hs, ws, _, refs = world()
    ref = unfused(hs, ws, None, refs)
    with torch.no_grad():
        torch.testing.assert_close(fused_distill_loss(hs, ws, refs), ref.detach())
    # Only the head trains (hidden states detached): its gradient alone is computed.
    loss = fused_distill_loss(hs.detach(), ws, refs, chunk_size=3)
    torch.testing.assert_close(grads(loss, ws)[0], grads(ref, ws)[0])


def test_nan_in_uncounted_positions_is_ignored():
    hs, ws, _, refs = world()
    mask = torch.ones(N, dtype=torch.bool)
    mask[3] = False
    bad = {r: (h.clone(), w) for r, (h, w) in refs.items()}
    bad["teacher_ft"][0][3] = float("nan")
    loss = fused_distill_loss(hs, ws, bad, mask=mask, chunk_size=2)
    assert_same(loss, unfused(hs, ws, None, refs, mask=mask), (hs, ws))


def test_bad_inputs_name_cause_and_fix():
    hs, ws, _, refs = world()
    with pytest.raises(ValueError, match="needs the 'teacher_ft2'"):
        no_ft2 = {k: v for k, v in refs.items() if k != "teacher_ft2"}
        fused_distill_loss(hs, ws, no_ft2, variant="multi_teacher")
    with pytest.raises(ValueError, match="leading shape"):
        fused_distill_loss(hs, ws, refs, mask=torch.ones(N + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"lm_head weight must be \[V, 5\]"):
        fused_distill_loss(hs, ws[:, :4], refs)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_distill_loss(hs, ws, refs, chunk_size=0)
    with pytest.raises(ValueError, match="plain KD"):
        fused_distill_loss(hs, ws, refs, variant=None, target_role="teacher")
    with pytest.raises(ValueError, match="unknown parallelogram variant"):
        fused_distill_loss(hs, ws, refs, variant="nope")


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op returns (elements)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_larger_than_a_chunk_of_logits_is_allocated():
    n, h, v, chunk = 64, 4, 100, 8  # N·V = 6400 ≫ chunk·V = 800 > V·H, N·H
    hs, ws, _, refs = world(n=n, h=h, v=v, dtype=torch.float32)
    inputs = max(x.numel() for x in (hs, ws))
    with _LargestAllocation() as fused_mode:
        fused_distill_loss(hs, ws, refs, variant="live_anchor", chunk_size=chunk).backward()
    assert fused_mode.largest <= max(chunk * v, inputs)
    with _LargestAllocation() as naive_mode:  # the detector does see a full [N, V] tensor
        unfused(hs, ws, None, refs).backward()
    assert naive_mode.largest >= n * v


def test_trainer_style_call_on_a_tiny_qwen2_matches_full_logits():
    # How the trainer calls it: the student's forward stops at the hidden states; positions are
    # shifted by the caller (hidden at t scores token t+1); lm_head tied to the embeddings.
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    student, teacher = Qwen2ForCausalLM(cfg).double(), Qwen2ForCausalLM(cfg).double()
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)[:, 1:]
    with torch.no_grad():
        t_hidden = teacher.model(input_ids=ids).last_hidden_state[:, :-1]
    refs = {"teacher_ft": (t_hidden, teacher.lm_head.weight)}
    hidden = student.model(input_ids=ids).last_hidden_state[:, :-1]  # (B, T-1, H)
    fused = fused_distill_loss(
        hidden, student.lm_head.weight, refs, variant=None, mask=mask, chunk_size=3,
        sft_weight=0.5, labels=ids[:, 1:],
    )  # fmt: skip
    g_fused = torch.autograd.grad(fused, list(student.parameters()))
    logits = student(input_ids=ids).logits[:, :-1]
    ce = F.cross_entropy(logits[mask], ids[:, 1:][mask])
    ref = 0.5 * ce + 0.5 * kd_loss(logits, teacher.lm_head(t_hidden), mask=mask)
    g_ref = torch.autograd.grad(ref, list(student.parameters()))
    torch.testing.assert_close(fused, ref)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b)


def test_sparse_target_with_tail_model_matches_kd_loss():
    hs, ws, _, refs = world()
    z = logits_of(*refs["teacher_ft"])
    basis, offset = fit_tail_model(torch.log_softmax(z.reshape(-1, z.shape[-1]), -1), rank=3)
    sparse = SparseTarget.from_logits(z, 4, tail_basis=basis.double(), tail_offset=offset.double())
    mask = randn(N, seed=7) > 0
    ref = kd_loss(logits_of(hs, ws), sparse, mask=mask)
    fused = fused_distill_loss(hs, ws, {"cache": sparse}, variant=None, target_role="cache",
                               mask=mask, chunk_size=3, softmax_chunk_size=2)  # fmt: skip
    assert_same(fused, ref, (hs, ws))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_logit_heads_with_scale_soft_cap_and_bias_match_their_logits(dtype):
    # The student's head and every reference's go through the model's own output layer
    # (deltakd.losses.heads.LogitHead); soft-capped references after the first use the scratch
    # buffer, 16-bit ones are capped after the upcast.
    hs, ws, _, refs = world(dtype=dtype, n=16, v=32, h=8)
    bs = randn(32, seed=4, dtype=dtype).requires_grad_()
    heads = {
        "teacher_ft": dict(softcap=1.5),
        "teacher_raw": dict(scale=0.5, softcap=2.0),
        "student_raw": dict(scale=3.0),
        "teacher_ft2": dict(softcap=1.0),
    }
    s_head = LogitHead(ws, bs, scale=0.8, softcap=2.5)
    given = {r: (h, LogitHead(w, **heads[r])) for r, (h, w) in refs.items()}
    mask = torch.ones(16, dtype=torch.bool)
    mask[[1, 9]] = False
    kw = dict(variant="multi_teacher", alpha=0.7, mask=mask, sft_weight=0.2,
              labels=torch.arange(16) % 32)  # fmt: skip
    fused = fused_distill_loss(hs, s_head, given, chunk_size=5, **kw)
    dense = {r: head.apply(h).float() for r, (h, head) in given.items()}
    z = s_head.apply(hs).float()
    kw.pop("variant")
    sft, labels = kw.pop("sft_weight"), kw.pop("labels")
    ref = (1 - sft) * parallelogram_loss(z, dense, variant="multi_teacher", **kw)
    ref = ref + sft * F.cross_entropy(z[mask], labels[mask])
    tol = {} if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(fused.to(ref.dtype), ref, **tol)
    for a, b in zip(grads(fused, hs, ws, bs), grads(ref, hs, ws, bs)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), **tol)
