"""Per-position divergences between a target distribution p and the student's q.

Both are softmaxes at temperature τ of logits over the same vocabulary:
`p = softmax(target / τ)`, `q = softmax(student / τ)`. Each function maps `(n, V)` logits to
`(n,)` divergences, in float32 (float64 if the inputs are float64). No τ² factor here: callers
that want Hinton's gradient scaling multiply the loss themselves.

Target entries of `-inf` are tokens of probability 0: every `0 · log 0` term is taken as 0, so
`fkl`, `jsd`, `skl`, `srkl` and `tvd` stay finite (and `rkl` is +inf exactly when the student
puts mass on a token the target forbids, as the math says).

References
- fkl / rkl: Hinton et al. 2015; Gu et al. 2024 (MiniLLM) for reverse KL in LM distillation.
- jsd: Agarwal et al. 2024 (GKD), generalized JSD with TRL's convention
  (m = β·p + (1−β)·q; β = 0 is forward KL, β = 1 reverse KL).
- skl / srkl: Ko et al. 2024 (DistiLLM), skew KL and skew reverse KL.
- tvd: Wen et al. 2023 (f-divergence minimisation for sequence-level KD).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

DIVERGENCES: tuple[str, ...] = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64 (exact references, gradcheck), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def kl_from_log_probs(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) = Σ a·(log a − log b) over the last dim, with 0·log 0 = 0.   # (n, V) -> (n,)"""
    a = log_a.exp()
    # where(), not a product with a, so that a = 0 never meets log 0 = -inf (0·inf = NaN).
    diff = torch.where(a > 0, log_a - log_b, torch.zeros((), dtype=log_a.dtype, device=a.device))
    return (a * diff).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1−w)·b) computed in log space; exact at w = 0 and w = 1."""
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _fkl(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    return kl_from_log_probs(logp, logq)


def _rkl(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    return kl_from_log_probs(logq, logp)


def _jsd(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    # TRL's generalized JSD degenerates to 0 at the ends; like TRL, take its limits instead.
    if beta <= 0.0:
        return kl_from_log_probs(logp, logq)
    if beta >= 1.0:
        return kl_from_log_probs(logq, logp)
    logm = _log_mix(logp, logq, beta)
    return beta * kl_from_log_probs(logp, logm) + (1.0 - beta) * kl_from_log_probs(logq, logm)


def _skl(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    return kl_from_log_probs(logp, _log_mix(logp, logq, beta))


def _srkl(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    return kl_from_log_probs(logq, _log_mix(logp, logq, 1.0 - beta))


def _tvd(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "fkl": _fkl,
    "rkl": _rkl,
    "jsd": _jsd,
    "skl": _skl,
    "srkl": _srkl,
    "tvd": _tvd,
}


def check_divergence_args(divergence: str, temperature: float, beta: float) -> None:
    """Raise `ValueError` naming the bad argument and what is allowed."""
    if divergence not in _FUNCTIONS:
        raise ValueError(
            f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}"
        )
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)) or (
        temperature <= 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")


def per_position_divergence(
    student_logits: torch.Tensor,
    target_logits: torch.Tensor,
    divergence: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """D(p ‖ q) per position for `(n, V)` logits; returns `(n,)` in the compute dtype.

    `p = softmax(target_logits / τ)`, `q = softmax(student_logits / τ)`; the divergence names
    and β conventions are those of docs/ARCHITECTURE.md §1.
    """
    dtype = compute_dtype(student_logits, target_logits)
    logq = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # (n, V)
    logp = torch.log_softmax(target_logits.to(dtype) / temperature, dim=-1)  # (n, V)
    return _FUNCTIONS[divergence](logp, logq, float(beta))
