"""Sparse targets: the top-k of a target distribution plus one bucket for the rest.

A dense target row over a 152k vocabulary is 600 KB in float32; its top-64 entries and the mass
left over are a few hundred bytes. With the tail treated as one bucket, forward KL against the
student is

    KL(p ‖ q) ≈ Σ_{i ∈ top-k} p_i (log p_i − log q_i) + p_tail (log p_tail − log q_tail),
    q_tail = 1 − Σ_{i ∈ top-k} q_i,

which is exact when k = V (p_tail = 0). The same encoding is what the offline cache stores
(DistillKit stores a teacher's top-k the same way; here it holds the Delta-KD target z*).

A tail bucket forgets how the tail mass is spread. An optional low-rank *tail model* keeps most
of that: logits are linear in a model's last hidden state, so the target's log-probabilities of
one dataset lie close to a low-dimensional subspace. With a basis B `(r, V)` and offset μ `(V,)`
fitted once (PCA of the target's log-probabilities) and r coefficients c per position,

    p̂_j = p_j                                        j ∈ top-k
    p̂_j = p_tail · softmax_{i ∉ top-k}(c·B + μ)_j     otherwise,

and the loss is the plain forward KL(p̂ ‖ q) over the whole vocabulary (gradient (q − p̂)/τ).
"""

from __future__ import annotations

from collections.abc import Callable
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
        tail_coeffs: optional `[..., r]` coefficients of the low-rank tail model (see the
            module docstring); None spreads nothing: the tail is one bucket.
        tail_basis: `(r, V)` basis of the tail model (shared by every position).
        tail_offset: `(V,)` offset μ of the tail model.
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    tail_mass: torch.Tensor
    temperature: float = 1.0
    tail_coeffs: torch.Tensor | None = None
    tail_basis: torch.Tensor | None = None
    tail_offset: torch.Tensor | None = None

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
        model = (self.tail_coeffs, self.tail_basis, self.tail_offset)
        if any(t is not None for t in model):
            if any(t is None for t in model):
                raise ValueError(
                    "a SparseTarget tail model needs tail_coeffs, tail_basis and tail_offset "
                    "together (or none of them)"
                )
            c, b, o = model
            if c.shape[:-1] != self.shape or b.dim() != 2 or c.shape[-1] != b.shape[0]:
                raise ValueError(
                    f"SparseTarget tail_coeffs {tuple(c.shape)} must be [..., r] with the leading "
                    f"shape {tuple(self.shape)}, and tail_basis {tuple(b.shape)} must be (r, V)"
                )
            if o.shape != b.shape[1:]:
                raise ValueError(
                    f"SparseTarget tail_offset {tuple(o.shape)} must be (V,) = "
                    f"({b.shape[1]},) like tail_basis"
                )

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

    @property
    def has_tail_model(self) -> bool:
        return self.tail_coeffs is not None

    @classmethod
    def from_logits(
        cls,
        logits: torch.Tensor,
        k: int,
        temperature: float = 1.0,
        *,
        tail_basis: torch.Tensor | None = None,
        tail_offset: torch.Tensor | None = None,
    ) -> SparseTarget:
        """Keep the top-k of `softmax(logits / τ)`; `logits` is `[..., V]`.

        With `tail_basis` `(r, V)` and `tail_offset` `(V,)` (see `fit_tail_model`), also keep
        the r coefficients that place the target's log-probabilities in that subspace.
        """
        if not 1 <= k <= logits.shape[-1]:
            raise ValueError(f"k must be in [1, V={logits.shape[-1]}], got {k}")
        dtype = compute_dtype(logits)
        coeffs = None
        with torch.no_grad():
            logp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)  # (..., V)
            top, idx = logp.topk(k, dim=-1)  # (..., k)
            # Tail from the kept mass, clamped: rounding can make 1 − Σ slightly negative.
            tail = (1.0 - top.exp().sum(-1)).clamp_min(0.0)
            if tail_basis is not None and tail_offset is not None:
                coeffs = tail_coefficients(logp, tail_basis, tail_offset)  # (..., r)
        return cls(idx, top, tail, float(temperature), coeffs, tail_basis, tail_offset)

    def map_positions(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> SparseTarget:
        """The same target with `fn` applied to every per-position tensor (indexing, `.to`)."""
        return SparseTarget(
            fn(self.indices),
            fn(self.logprobs),
            fn(self.tail_mass),
            self.temperature,
            None if self.tail_coeffs is None else fn(self.tail_coeffs),
            self.tail_basis,
            self.tail_offset,
        )

    def dense_logprobs(self, vocab_size: int | None = None) -> torch.Tensor:
        """`[..., V]` log-probabilities the target stands for: the top-k as stored, and the tail
        mass spread by the tail model, or uniformly over the V − k other tokens without one
        (then `vocab_size` is needed: a bucket target does not know V)."""
        flat = self.reshape_flat()
        idx, logp, tail = flat[:3]
        if self.tail_basis is not None and self.tail_offset is not None:
            out = _tail_model_logprobs(idx, logp, tail, flat[3], self.tail_basis, self.tail_offset)
            return out.reshape(*self.shape, out.shape[-1])
        if vocab_size is None:
            raise ValueError(
                "a SparseTarget without a tail model needs vocab_size to spread its tail"
            )
        dtype = compute_dtype(logp)
        others = max(vocab_size - self.k, 1)
        log_each = torch.where(tail > 0, tail.to(dtype) / others, 1.0).log()
        log_each = torch.where(tail > 0, log_each, float("-inf"))
        out = log_each[:, None].expand(-1, vocab_size).contiguous()  # (N, V)
        return out.scatter_(-1, idx, logp.to(dtype)).reshape(*self.shape, vocab_size)

    def reshape_flat(self) -> tuple[torch.Tensor, ...]:
        """(indices (N, k), logprobs (N, k), tail_mass (N,)[, tail_coeffs (N, r)]) with the
        leading dims flattened; the coefficients only when there is a tail model."""
        k = self.k
        flat = (
            self.indices.reshape(-1, k),
            self.logprobs.reshape(-1, k),
            self.tail_mass.reshape(-1),
        )
        if self.tail_coeffs is not None:
            flat = (*flat, self.tail_coeffs.reshape(-1, self.tail_coeffs.shape[-1]))
        return flat


def tail_coefficients(
    logprobs: torch.Tensor, basis: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """`[..., r]` coordinates of log-probabilities `[..., V]` in the tail model's subspace.

    Log-probabilities are floored at −80 first (a token the models rule out has −inf, which
    no subspace holds; e^−80 is nothing next to any tail mass that matters).
    """
    dtype = basis.dtype
    x = logprobs.to(dtype).clamp_min(-80.0) - offset.to(logprobs.device)  # (..., V)
    return x @ basis.to(logprobs.device).T  # (..., r)


def fit_tail_model(logprobs: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of target log-probabilities `(n, V)`: (basis `(rank, V)`, offset `(V,)`), float32.

    The basis rows are the top right-singular vectors of the centred rows, computed in float32
    on the input's device (a (4096, 152k) fit is 2.5 GB); deterministic (a full SVD, no random
    sketch), so a resumed cache build fits the same model.
    """
    if logprobs.dim() != 2:
        raise ValueError(
            f"fit_tail_model takes (n, V) log-probabilities, got {tuple(logprobs.shape)}"
        )
    n, v = logprobs.shape
    if not 1 <= rank <= min(n, v):
        raise ValueError(
            f"tail model rank must be in [1, min(n={n} positions, V={v})], got {rank}; fit it on "
            "more positions or lower the rank"
        )
    x = logprobs.float().clamp_min(-80.0)
    offset = x.mean(0)  # (V,)
    _, _, vh = torch.linalg.svd(x - offset, full_matrices=False)  # (min(n, V), V)
    basis = vh[:rank]
    # Fix each vector's sign (SVD's is arbitrary) so fits on the same data agree bit for bit.
    sign = torch.sign(basis.gather(1, basis.abs().argmax(1, keepdim=True)))
    return (basis * sign).contiguous(), offset.contiguous()


def _tail_model_logprobs(
    idx: torch.Tensor,
    logp_k: torch.Tensor,
    tail_mass: torch.Tensor,
    coeffs: torch.Tensor,
    basis: torch.Tensor,
    offset: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """log p̂ `(n, V)`: stored top-k, and the tail mass spread by softmax(c·B + μ) over the rest."""
    dtype = dtype or compute_dtype(logp_k)
    u = torch.addmm(offset.to(dtype), coeffs.to(dtype), basis.to(dtype))  # (n, V)
    if idx.shape[-1] == u.shape[-1]:  # k = V: no tail
        return u.fill_(float("-inf")).scatter_(-1, idx, logp_k.to(dtype))
    u.scatter_(-1, idx, float("-inf"))
    log_w = torch.log_softmax(u, dim=-1)  # (n, V), −inf on the top-k
    log_tail = torch.where(tail_mass > 0, tail_mass.to(dtype), 1.0).log()
    out = torch.where((tail_mass > 0)[:, None], log_w + log_tail[:, None], float("-inf"))
    return out.scatter_(-1, idx, logp_k.to(dtype))


class _GradInForward(torch.autograd.Function):
    """Base for per-position losses whose forward writes out d loss_i / d student (n, V):
    backward only scales it by the incoming (n,) gradient."""

    @staticmethod
    def keep(ctx, grad: torch.Tensor, student: torch.Tensor, n_inputs: int) -> None:
        ctx.save_for_backward(grad)
        ctx.student_dtype = student.dtype
        ctx.n_others = n_inputs - 1

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad_output[:, None] * grad).to(ctx.student_dtype), *([None] * ctx.n_others)


class _SparseFKL(_GradInForward):
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
            q_k = q.gather(-1, idx)  # (n, k)
            # q_tail = 1 − Σ_k q_k loses relative precision when q_tail is small; those rows
            # (few, once the student is trained) are summed over their tail instead.
            q_tail = 1.0 - q_k.sum(-1)  # (n,)
            small = q_tail < 1e-2
            if small.any():
                rows = small.nonzero().squeeze(1)
                exact = q[rows].scatter_(-1, idx[rows], 0.0).sum(-1)  # positive terms only
                q_tail = q_tail.index_put((rows,), exact)
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
            grad_k = (q_k * mass[:, None] - p_k) / temperature
            grad = grad.mul_(((mass - ratio) / temperature)[:, None]).scatter_(-1, idx, grad_k)
        else:
            grad = grad.mul_(mass[:, None]).scatter_add_(-1, idx, -p_k).div_(temperature)
        _GradInForward.keep(ctx, grad, student, n_inputs=5)
        return loss


class _ModelledFKL(_GradInForward):
    """Forward KL(p̂ ‖ q) over the whole vocabulary against a target with a tail model.

    With w = softmax_{tail}(c·B + μ), p̂ = p_k on the top-k and p_tail·w elsewhere:

        L = Σ_k p_k (log p_k − log q_k) + p_tail (log p_tail + Σ_tail w (log w − log q)),
        ∂L/∂z_j = (m · q_j − p̂_j) / τ,   m = Σ p̂ (1 up to rounding).

    p̂ is never built: its tail enters through w (one softmax), so one [n, V] buffer holds
    log q and then the gradient, another log w and then w.
    """

    @staticmethod
    def forward(ctx, student, idx, logp_k, tail_mass, coeffs, basis, offset, temperature):  # type: ignore[override]
        dtype = compute_dtype(student, logp_k)
        zero = torch.zeros((), dtype=dtype, device=student.device)
        logq = torch.log_softmax(student.to(dtype) / temperature, dim=-1)  # (n, V)
        logp_k = logp_k.to(dtype)
        p_k = logp_k.exp()  # (n, k)
        logq_k = logq.gather(-1, idx)  # (n, k)
        loss = (p_k * torch.where(p_k > 0, logp_k - logq_k, zero)).sum(-1)  # (n,)
        mass = p_k.sum(-1)  # (n,)
        has_tail = idx.shape[-1] < logq.shape[-1]
        if has_tail:
            p_tail = tail_mass.to(dtype)
            mass = mass + p_tail
            u = torch.addmm(offset.to(dtype), coeffs.to(dtype), basis.to(dtype))  # (n, V)
            log_w = torch.log_softmax(u.scatter_(-1, idx, float("-inf")), dim=-1)  # −inf on top-k
            w = log_w.exp()  # (n, V), 0 on the top-k
            # Σ_tail w (log w − log q): the top-k terms are 0 · (−inf); zero them first.
            cross = torch.linalg.vecdot(w, log_w.sub_(logq).scatter_(-1, idx, 0.0))  # (n,)
            safe = torch.where(p_tail > 0, p_tail, torch.ones_like(p_tail))
            loss = loss + torch.where(p_tail > 0, p_tail * (safe.log() + cross), zero)
        grad = logq.exp_()  # q, in place of log q
        grad_k = (grad.gather(-1, idx) * mass[:, None] - p_k) / temperature  # (n, k)
        grad.mul_((mass / temperature)[:, None])
        if has_tail:
            grad.addcmul_(w, (p_tail / temperature)[:, None], value=-1.0)
        grad.scatter_(-1, idx, grad_k)
        _GradInForward.keep(ctx, grad, student, n_inputs=8)
        return loss


def sparse_fkl_per_position(
    student_logits: torch.Tensor,
    indices: torch.Tensor,
    logprobs: torch.Tensor,
    tail_mass: torch.Tensor,
    temperature: float = 1.0,
    tail_coeffs: torch.Tensor | None = None,
    tail_basis: torch.Tensor | None = None,
    tail_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL from a top-k target to the student, per position.

    Shapes: student `(n, V)`, indices/logprobs `(n, k)`, tail_mass `(n,)` → `(n,)`; with a
    tail model also tail_coeffs `(n, r)`, tail_basis `(r, V)`, tail_offset `(V,)`, and the KL
    is then taken over the whole vocabulary against p̂ instead of with a tail bucket.
    Differentiable with respect to the student only (targets are data).
    """
    if tail_coeffs is not None:
        if tail_basis is None or tail_offset is None:
            raise ValueError("tail_coeffs need tail_basis and tail_offset")
        return _ModelledFKL.apply(
            student_logits,
            indices.long(),
            logprobs.detach(),
            tail_mass.detach(),
            tail_coeffs.detach(),
            tail_basis.detach(),
            tail_offset.detach(),
            temperature,
        )
    return _SparseFKL.apply(
        student_logits, indices.long(), logprobs.detach(), tail_mass.detach(), temperature
    )
