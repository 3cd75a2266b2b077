"""`LogitHead`: what a causal LM computes between its last hidden state and its logits.

Most families compute `logits = hidden @ W.T`, but some do more: an lm_head bias (Phi), a
multiplier (Cohere's `logit_scale`) or divisor (Granite's `logits_scaling`), a final soft cap
`c · tanh(z / c)` (Gemma 2 / 3's `final_logit_softcapping`). A `LogitHead` describes all of it,
so every place that makes logits from hidden states (the fused loss, hidden-state references,
the cache builder) reproduces the model's own forward:

    z = softcap((hidden @ weight.T + bias) · scale)        softcap(x) = c · tanh(x / c)

Pure tensor code: which family has which head is decided in `deltakd.heads`, not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class LogitHead:
    """A model's output layer: `z = softcap((h @ weight.T + bias) · scale)`.

    Attributes:
        weight: `[V, H]` lm_head weight (may require grad: the student's head).
        bias: `[V]` lm_head bias, or None.
        scale: multiplies the logits (Cohere: `logit_scale`; Granite: `1 / logits_scaling`).
        softcap: `c` of the final soft cap `c · tanh(z / c)` (Gemma 2 / 3), or None.
        family: the model family it was read from (for messages), or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None
    family: str | None = None

    def __post_init__(self) -> None:
        if self.weight.dim() != 2:
            raise ValueError(f"LogitHead weight must be [V, H], got {tuple(self.weight.shape)}")
        if self.bias is not None and self.bias.shape != (self.weight.shape[0],):
            raise ValueError(
                f"LogitHead bias must be [{self.weight.shape[0]}], got {tuple(self.bias.shape)}"
            )
        if not (math.isfinite(self.scale) and self.scale != 0.0):
            raise ValueError(f"LogitHead scale must be finite and non-zero, got {self.scale!r}")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise ValueError(f"LogitHead softcap must be a positive number, got {self.softcap!r}")

    @property
    def is_linear(self) -> bool:
        """True when the logits are `h @ W.T + b` times a constant (no soft cap)."""
        return self.softcap is None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """The same head with weight and bias moved / cast (no copy when nothing changes)."""
        w = self.weight.to(device=device, dtype=dtype)
        b = None if self.bias is None else self.bias.to(device=device, dtype=dtype)
        return replace(self, weight=w, bias=b)

    def transform_(self, z: torch.Tensor) -> torch.Tensor:
        """Apply scale and soft cap to `h @ W.T + b` in place; returns `z`."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            # The order of the models' own forward (Gemma 2): divide, tanh, multiply.
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def backward_(self, grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """dL/d(h @ W.T + b) from dL/dz, in place in `grad`; `z` (the transformed logits) is
        overwritten. d softcap(x)/dx = 1 − tanh² = 1 − (z / c)²."""
        if self.softcap is not None:
            # grad · (1 − z²/c²) as grad − (grad · z²)/c²: two passes over the chunk.
            grad.addcmul_(grad, z.square_(), value=-1.0 / self.softcap**2)
        if self.scale != 1.0:
            grad.mul_(self.scale)
        return grad

    def float32_logits(self, hidden: torch.Tensor, vocab: int | None = None) -> torch.Tensor:
        """Logits `[..., V]` in float32 from hidden states and a head of any dtype: a 16-bit
        head's product is accumulated and kept in float32 (`linear_float32_`) instead of being
        rounded to 16 bits as the model's own forward does. Not differentiable (references)."""
        w = self.weight if vocab is None else self.weight[:vocab]
        b = self.bias if vocab is None or self.bias is None else self.bias[:vocab]
        flat = hidden.detach().reshape(-1, hidden.shape[-1])  # (n, H)
        z = torch.empty(flat.shape[0], w.shape[0], dtype=torch.float32, device=flat.device)
        linear_float32_(z, flat, w.detach())
        if b is not None:
            z.add_(b.detach().to(torch.float32))
        self.transform_(z)
        return z.view(*hidden.shape[:-1], w.shape[0])

    def apply(self, hidden: torch.Tensor, vocab: int | None = None) -> torch.Tensor:
        """Logits `[..., V]` of hidden states `[..., H]` (rows beyond `vocab` dropped), computed
        in the head's dtype, as the model's forward does. Differentiable."""
        w = self.weight if vocab is None else self.weight[:vocab]
        b = self.bias if vocab is None or self.bias is None else self.bias[:vocab]
        z = torch.nn.functional.linear(hidden.to(w.dtype), w, b)
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


#: Head rows upcast at a time by `linear_float32_` (2^21 elements: 8 MiB in float32).
UPCAST_BLOCK_ELEMENTS = 1 << 21


def linear_float32_(
    out: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 0.0,
) -> torch.Tensor:
    """`out = beta · out + alpha · hidden @ weight.T` in float32, for hidden `(n, H)` and weight
    `(V, H)` of any float dtype; returns `out` `(n, V)` (float32 or float64).

    With 16-bit inputs the product is accumulated and kept in float32 — the model's own lm_head
    rounds it to 16 bits, which costs the Delta-KD target 1.4e-3 nats/token in bf16
    (docs/BENCHMARKS.md). On CUDA, `torch.mm(..., out_dtype=float32)`. PyTorch's CPU matmul
    has no 16-bit → float32 form, so there the head is upcast a block of rows at a time (no
    float32 copy of the whole [V, H] head is kept) and multiplied in float32 — several times
    slower than a bf16 matmul on CPUs with bf16 matrix units (`deltakd bench precision
    --cost`). bf16 → float32 is exact, so this equals a float32 matmul of the rounded inputs."""
    if weight.dtype == out.dtype:
        h = hidden.to(out.dtype)  # (n, H)
        return torch.addmm(out, h, weight.t(), beta=beta, alpha=alpha, out=out)
    if out.is_cuda and out.dtype == torch.float32 and hidden.dtype == weight.dtype:
        # cuBLAS accumulates 16-bit products in float32 anyway: ask for that output directly.
        # (Not run on a GPU in this project yet; any refusal falls through to the upcast.)
        try:
            z = torch.mm(hidden, weight.t(), out_dtype=torch.float32)  # (n, V)
        except (RuntimeError, NotImplementedError, TypeError):
            pass
        else:
            if beta == 0.0:
                return torch.mul(z, alpha, out=out) if alpha != 1.0 else out.copy_(z)
            return out.mul_(beta).add_(z, alpha=alpha)
    h = hidden.to(out.dtype)  # (n, H)
    rows = max(1, UPCAST_BLOCK_ELEMENTS // max(weight.shape[1], 1))
    for v0 in range(0, weight.shape[0], rows):
        block = weight[v0 : v0 + rows].to(out.dtype)  # (rows, H)
        dest = out[:, v0 : v0 + rows]
        torch.addmm(dest, h, block.t(), beta=beta, alpha=alpha, out=dest)
    return out


def as_logit_head(head: torch.Tensor | LogitHead) -> LogitHead:
    """A `LogitHead` from a head description or a plain `[V, H]` weight (`h @ W.T`)."""
    return head if isinstance(head, LogitHead) else LogitHead(head)


__all__ = ["LogitHead", "as_logit_head", "linear_float32_"]
