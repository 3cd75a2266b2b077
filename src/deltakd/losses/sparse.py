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


def sparse_fkl_per_position(
    student_logits: torch.Tensor,
    indices: torch.Tensor,
    logprobs: torch.Tensor,
    tail_mass: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Forward KL from a top-k + tail-bucket target to the student, per position.

    Shapes: student `(n, V)`, indices/logprobs `(n, k)`, tail_mass `(n,)` → `(n,)`.
    """
    dtype = compute_dtype(student_logits, logprobs)
    zero = torch.zeros((), dtype=dtype, device=student_logits.device)
    logq = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # (n, V)
    idx = indices.long()
    logq_k = logq.gather(-1, idx)  # (n, k)
    logp_k = logprobs.to(dtype)
    p_k = logp_k.exp()
    head = (p_k * torch.where(p_k > 0, logp_k - logq_k, zero)).sum(-1)  # (n,)
    if idx.shape[-1] == logq.shape[-1]:
        return head  # k = V: nothing outside the top-k
    # log q_tail as a logsumexp over the tokens outside the top-k: stable where 1 − Σ q_k is not.
    log_q_tail = logq.scatter(-1, idx, float("-inf")).logsumexp(-1)  # (n,)
    p_tail = tail_mass.to(dtype)
    log_p_tail = torch.where(p_tail > 0, p_tail, torch.ones_like(p_tail)).log()
    tail = p_tail * torch.where(p_tail > 0, log_p_tail - log_q_tail, zero)
    return head + tail
