"""Closed-form value and gradient of a divergence over one `(rows, V)` slice of logits.

The chunked and fused losses used to evaluate each slice through autograd: log-softmax, the
divergence with its `p > 0` guards, then `torch.autograd.grad` — about sixty elementwise passes
over the slice for generalized JSD (docs/BENCHMARKS.md, "Where the fused loss's time goes").
For the divergences whose gradient w.r.t. the student's logits has a short closed form, this
module computes value and gradient together in about a dozen passes into buffers allocated once:

    q = softmax(s/τ), p = softmax(t/τ)
    fkl  Σ p (log p − log q)                  ∂/∂s = (q − p) / τ
    rkl  Σ q (log q − log p)                  ∂/∂s = q ⊙ (log q − log p − KL(q‖p)) / τ
    jsd  β KL(p‖m) + (1−β) KL(q‖m),           ∂/∂s = (1−β) q ⊙ (log q − log m − KL(q‖m)) / τ
         m = β p + (1−β) q

(the JSD gradient: ∂J/∂q_j = (1−β)(log q_j − log m_j), the p-terms cancel; then through the
softmax). Optionally the cross-entropy of the student against hard labels at τ = 1, whose
gradient `q − onehot` shares q.

No guards run on the hot path. A target of `-inf` (probability 0), an underflowed mixture `m`,
or a student that forbids a token the target allows make some row's value non-finite (0·∞);
`SliceGrad.__call__` then returns None before touching `out`, and the caller evaluates that
slice on its autograd path, which handles every such case exactly as before.
"""

from __future__ import annotations

import math

import torch

#: Logits per softmax / divergence slice when the caller does not choose: 2^21 (8 MiB in
#: float32, 13 rows of a 152k vocabulary). Small slices bound the intermediates and stay
#: cache-friendly; larger ones measured no faster on CPU and used more memory.
DEFAULT_SOFTMAX_ELEMENTS = 1 << 21

#: Divergences with a closed-form path here; the others take the autograd path.
CLOSED_FORM: tuple[str, ...] = ("fkl", "rkl", "jsd")


def supports(divergence: str, temperature: float, with_labels: bool) -> bool:
    """Whether `SliceGrad` computes this case (labels need τ = 1: their CE is at τ = 1)."""
    return divergence in CLOSED_FORM and (not with_labels or temperature == 1.0)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[r, v]·b[r, v] per row, without an (r, V) temporary.   # (r, V), (r, V) -> (r,)

    One BLAS dot per row: measured 4× faster than a batched (r, 1, V) @ (r, V, 1) `bmm` and
    2× faster than `(a * b).sum(-1)` on a (13, 152k) float32 slice."""
    return torch.stack([torch.dot(a[i], b[i]) for i in range(a.shape[0])])


class SliceGrad:
    """Value and gradient of one divergence over `(r, V)` slices, `r ≤ rows`, buffers reused.

    Args:
        divergence: one of `CLOSED_FORM`.
        temperature: τ of both softmaxes.
        beta: β of `jsd` (0 is forward KL, 1 reverse KL, as in `divergences`).
        rows, vocab, dtype, device: the largest slice and its dtype (float32 / float64).
    """

    def __init__(
        self,
        divergence: str,
        temperature: float,
        beta: float,
        rows: int,
        vocab: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if divergence not in CLOSED_FORM:
            raise ValueError(f"no closed form for {divergence!r}; use one of {CLOSED_FORM}")
        if divergence == "jsd" and beta <= 0.0:
            divergence = "fkl"
        elif divergence == "jsd" and beta >= 1.0:
            divergence = "rkl"
        self.divergence = divergence
        self.tau = float(temperature)
        self.beta = float(beta)
        #: `factor · out` is the gradient (the constant is left to the caller's matmuls).
        self.factor = (1.0 - self.beta if divergence == "jsd" else 1.0) / self.tau
        # log q, log p, q (rkl / jsd), p: the slice's intermediates, reused by every call.
        shape = (rows, vocab)
        self._lq = torch.empty(shape, dtype=dtype, device=device)
        self._lp = torch.empty(shape, dtype=dtype, device=device)
        self._q = torch.empty(shape, dtype=dtype, device=device)
        self._p = torch.empty(shape, dtype=dtype, device=device)
        # log m (jsd): its own buffer, as `out` may be the target, needed if a row falls back.
        self._m = torch.empty(shape, dtype=dtype, device=device) if divergence == "jsd" else None

    def _softmax(self, x: torch.Tensor, log_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """log softmax(x/τ) into `log_out` and softmax(x/τ) into `out`, from one `exp` per
        element (log_softmax then exp would take two)."""
        if self.tau != 1.0:  # no division pass at τ = 1
            torch.mul(x.to(log_out.dtype), 1.0 / self.tau, out=log_out)
            log_out.sub_(log_out.amax(dim=-1, keepdim=True))
        elif x.dtype != log_out.dtype:  # 16-bit logits: upcast before subtracting the max
            log_out.copy_(x)
            log_out.sub_(log_out.amax(dim=-1, keepdim=True))
        else:
            torch.sub(x, x.amax(dim=-1, keepdim=True), out=log_out)
        torch.exp(log_out, out=out)
        total = out.sum(dim=-1, keepdim=True)  # (r, 1)
        log_out.sub_(total.log())
        out.mul_(total.reciprocal_())
        return log_out

    def __call__(
        self,
        student: torch.Tensor,
        target: torch.Tensor,
        out: torch.Tensor,
        labels: torch.Tensor | None = None,
        ignore_index: int = -100,
        sft_ratio: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Per-row divergences of `student` (r, V) against `target` (r, V), gradient into `out`.

        Writes `out` so that `self.factor · out` is ∂/∂student of `Σ D + sft_ratio · Σ CE`,
        where CE is the cross-entropy against `labels` (r,) skipping `ignore_index` (τ must be
        1). `out` may be `target` itself (it is written last). Returns `(per (r,), ce_sum or
        None)`, or None — with `out` untouched — when a row's value is not finite.
        """
        r = student.shape[0]
        div = self.divergence
        q = self._q[:r]
        p = self._p[:r]
        lq = self._softmax(student, self._lq[:r], q)  # (r, V) log q, q
        lp = self._softmax(target, self._lp[:r], p)  # (r, V) log p, p
        ce = None
        if labels is not None:
            valid = labels != ignore_index
            picked = lq.gather(1, labels.clamp(min=0).unsqueeze(1)).view(-1)  # (r,) log q[y]
            ce = -(picked * valid).sum()
            if not bool(torch.isfinite(ce)):
                return None
            coef = sft_ratio * valid.to(lq.dtype)  # (r,)
        if div == "fkl":
            lp.sub_(lq)  # log p − log q
            per = _rowdot(p, lp)
            if not bool(torch.isfinite(per).all()):
                return None
            if labels is None:
                torch.sub(q, p, out=out)  # (q − p), times 1/τ
                return per, ce
            # τ = 1: (q − p) + ρ_i (q − onehot), ρ_i = sft_ratio where the label counts
            torch.mul(q, (1.0 + coef).unsqueeze(1), out=out).sub_(p)
            _sub_onehot(out, labels, valid, coef)
            return per, ce
        if div == "rkl":
            lq.sub_(lp)  # log q − log p
            per = _rowdot(q, lq)
            if not bool(torch.isfinite(per).all()):
                return None
            shift = per  # KL(q‖p)
            scale = 1.0
        else:  # jsd, 0 < β < 1
            beta = self.beta
            # m/β = p + c·q: its log is log m − log β (the constant is added back below).
            m = torch.add(p, q, alpha=(1.0 - beta) / beta, out=self._m[:r])
            m.log_()
            lp.sub_(m)
            lq.sub_(m)  # log q − log m + log β
            log_beta = math.log(beta)
            kl_pm = _rowdot(p, lp) - log_beta
            kl_qm = _rowdot(q, lq) - log_beta
            per = beta * kl_pm + (1.0 - beta) * kl_qm
            if not bool(torch.isfinite(per).all()):
                return None
            shift = kl_qm + log_beta  # lq holds log q − log m + log β
            scale = 1.0 - beta
        # scale/τ · q ⊙ (lq − shift) + ρ (q − onehot)  =  scale/τ · q ⊙ (lq − shift + ρτ/scale)
        rho = sft_ratio * self.tau / scale if labels is not None else 0.0
        if labels is not None and rho:
            shift = shift - coef * (self.tau / scale)
        lq.sub_(shift.unsqueeze(1))
        torch.mul(q, lq, out=out)
        if labels is not None and rho:
            _sub_onehot(out, labels, valid, coef * (self.tau / scale))
        return per, ce


def _sub_onehot(
    out: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, amount: torch.Tensor
) -> None:
    """out[i, labels[i]] −= amount[i] for rows whose label counts.   # (r, V), (r,)"""
    rows = valid.nonzero().squeeze(1)
    cols = labels.index_select(0, rows)
    out.index_put_((rows, cols), -amount.index_select(0, rows).to(out.dtype), accumulate=True)


__all__ = ["CLOSED_FORM", "DEFAULT_SOFTMAX_ELEMENTS", "SliceGrad", "supports"]
