"""Sparse targets: the top-k of a target distribution plus one bucket for the rest.

A dense target row over a 152k vocabulary is 600 KB in float32; its top-64 entries and the mass
left over are a few hundred bytes. With the tail treated as one bucket, forward KL against the
student is

    KL(p ‖ q) ≈ Σ_{i ∈ top-k} p_i (log p_i − log q_i) + p_tail (log p_tail − log q_tail),
    q_tail = 1 − Σ_{i ∈ top-k} q_i,

which is exact when k = V (p_tail = 0). The same encoding is what the offline cache stores
(DistillKit stores a teacher's top-k the same way; here it holds the Delta-KD target z*).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltakd.losses.divergences import compute_dtype


@dataclass
class SparseTarget:
    """Top-k of a target distribution at a temperature, with its tail mass.

    Attributes:
        indices:  `[..., k]` integer token ids, unique along the last dim.
        logprobs: `[..., k]` log-probabilities of those tokens under `softmax(z / τ)`.
        tail_mass: `[...]` probability of all other tokens (1 − Σ exp(logprobs)), ≥ 0.
        temperature: τ at which the probabilities were computed.
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    tail_mass: torch.Tensor
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.indices.shape != self.logprobs.shape:
            raise ValueError(
                f"SparseTarget indices {tuple(self.indices.shape)} and logprobs "
                f"{tuple(self.logprobs.shape)} must have the same shape [..., k]"
            )
        if self.tail_mass.shape != self.indices.shape[:-1]:
            raise ValueError(
                f"SparseTarget tail_mass {tuple(self.tail_mass.shape)} must have the leading "
                f"shape {tuple(self.indices.shape[:-1])} of indices [..., k]"
            )
        if self.indices.dtype.is_floating_point:
            raise ValueError("SparseTarget indices must be an integer tensor")

    def check_usable(self, divergence: str, temperature: float) -> None:
        """Raise `ValueError` unless a loss may use this target with `divergence` at `temperature`.

        Only forward KL has a top-k + tail-bucket form, and the probabilities were fixed at the
        temperature the target was built with.
        """
        if divergence != "fkl":
            raise ValueError(
                f"sparse (top-k) targets support divergence='fkl' only, got {divergence!r}; "
                "use dense references for other divergences"
            )
        if abs(self.temperature - temperature) > 1e-9:
            raise ValueError(
                f"the sparse target was computed at temperature {self.temperature}, but the "
                f"loss uses temperature {temperature}; rebuild it at this temperature"
            )

    @property
    def shape(self) -> torch.Size:
        """Leading shape (positions), without k."""
        return self.indices.shape[:-1]

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int, temperature: float = 1.0) -> SparseTarget:
        """Keep the top-k of `softmax(logits / τ)`; `logits` is `[..., V]`."""
        if not 1 <= k <= logits.shape[-1]:
            raise ValueError(f"k must be in [1, V={logits.shape[-1]}], got {k}")
        dtype = compute_dtype(logits)
        with torch.no_grad():
            logp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)  # (..., V)
            top, idx = logp.topk(k, dim=-1)  # (..., k)
            # Tail from the kept mass, clamped: rounding can make 1 − Σ slightly negative.
            tail = (1.0 - top.exp().sum(-1)).clamp_min(0.0)
        return cls(idx, top, tail, float(temperature))

    def reshape_flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices (N, k), logprobs (N, k), tail_mass (N,)) with leading dims flattened."""
        k = self.k
        return (
            self.indices.reshape(-1, k),
            self.logprobs.reshape(-1, k),
            self.tail_mass.reshape(-1),
        )


class _SparseFKL(torch.autograd.Function):
    """Bucketed forward KL per position with its gradient written out.

    With m = Σ_k p_k + p_tail (1 up to rounding), L = Σ_k p_k log p_k + p_tail log p_tail
    − Σ_k p_k log q_k − p_tail log q_tail, and with q = softmax(z / τ)

        ∂L/∂z_j = (m · q_j − p̃_j) / τ,   p̃_j = p_j on the top-k,  p_tail · q_j / q_tail elsewhere.

    One softmax and one [n, V] gradient, instead of autograd's graph through a scatter and a
    logsumexp over a masked copy (about twice as fast, and one [n, V] buffer fewer).
    """

    @staticmethod
    def forward(ctx, student, idx, logp_k, tail_mass, temperature):  # type: ignore[override]
        dtype = compute_dtype(student, logp_k)
        zero = torch.zeros((), dtype=dtype, device=student.device)
        logq = torch.log_softmax(student.to(dtype) / temperature, dim=-1)  # (n, V)
        q = logq.exp()
        logp_k = logp_k.to(dtype)
        p_k = logp_k.exp()  # (n, k)
        loss = (p_k * torch.where(p_k > 0, logp_k - logq.gather(-1, idx), zero)).sum(-1)
        mass = p_k.sum(-1)  # (n,)
        grad = q  # reused in place: q is not needed once the gradient is built
        if idx.shape[-1] < q.shape[-1]:
            p_tail = tail_mass.to(dtype)
            mass = mass + p_tail
            # q_tail as a sum of positive terms: no cancellation, unlike 1 − Σ_k q_k.
            q_tail = q.scatter(-1, idx, 0.0).sum(-1)  # (n,)
            log_q_tail = q_tail.log()
            under = q_tail <= torch.finfo(dtype).tiny
            if under.any():  # the student left (almost) nothing outside the top-k
                rows = under.nonzero().squeeze(1)
                masked = logq[rows].scatter(-1, idx[rows], float("-inf"))
                log_q_tail = log_q_tail.index_put((rows,), masked.logsumexp(-1))
            safe_p_tail = torch.where(p_tail > 0, p_tail, torch.ones_like(p_tail))
            loss = loss + torch.where(p_tail > 0, p_tail * (safe_p_tail.log() - log_q_tail), zero)
            ratio = torch.where(
                p_tail > 0, p_tail / q_tail.clamp_min(torch.finfo(dtype).tiny), zero
            )
            # Everyone gets (m − p_tail/q_tail)·q_j; the top-k entries are then overwritten.
            grad_k = q.gather(-1, idx) * mass[:, None] - p_k
            grad = grad.mul_((mass - ratio)[:, None]).scatter_(-1, idx, grad_k)
        else:
            grad = grad.mul_(mass[:, None]).scatter_add_(-1, idx, -p_k)
        ctx.save_for_backward(grad.div_(temperature))
        ctx.student_dtype = student.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad_output[:, None] * grad).to(ctx.student_dtype), None, None, None, None


def sparse_fkl_per_position(
    student_logits: torch.Tensor,
    indices: torch.Tensor,
    logprobs: torch.Tensor,
    tail_mass: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Forward KL from a top-k + tail-bucket target to the student, per position.

    Shapes: student `(n, V)`, indices/logprobs `(n, k)`, tail_mass `(n,)` → `(n,)`.
    Differentiable with respect to the student only (targets are data).
    """
    return _SparseFKL.apply(
        student_logits, indices.long(), logprobs.detach(), tail_mass.detach(), temperature
    )
