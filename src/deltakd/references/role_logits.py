"""`RoleLogits`: a reference batch's outputs as next-token logits of the shared vocabulary.

Used by the trainer's loss and by the offline cache builder alike (docs/ARCHITECTURE.md), so
hidden states from a source become logits the same way in both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from deltakd.errors import DeltaKDError
from deltakd.losses.heads import LogitHead, as_logit_head
from deltakd.references.base import ReferenceBatch


class RoleLogits:
    """The frozen roles' logits for one micro-batch, aligned with `StudentBatch.student_logits`.

    `logits(role)` returns `[B, T-1, V]` (next-token positions, shared vocabulary), computed
    from hidden states and the role's output layer (`heads[role]`, a `LogitHead`: bias, scale
    and soft cap as the model's forward; a plain [V, H] weight also works) when the source sent
    hidden states — in float32, also for a 16-bit model (`LogitHead.float32_logits`). `target` is the source's ready `SparseTarget` (offline cache), trimmed the
    same way, or None.
    """

    def __init__(
        self,
        ref: ReferenceBatch,
        heads: Mapping[str, LogitHead | torch.Tensor],
        vocab_size: int,
        device: torch.device,
    ) -> None:
        self.ref = ref
        self.heads = heads
        self.vocab_size = vocab_size
        self.device = device
        self._cache: dict[str, torch.Tensor] = {}
        self.target = _trim_sparse(ref.target, device) if ref.target is not None else None

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.ref.logits) + tuple(self.ref.hidden)

    def logits(self, role: str) -> torch.Tensor:
        if role in self._cache:
            return self._cache[role]
        v = self.vocab_size
        if role in self.ref.logits:
            out = self.ref.logits[role][:, :-1, :v]
        elif role in self.ref.hidden:
            head = as_logit_head(self.heads[role]).to(self.device)
            hidden = self.ref.hidden[role][:, :-1]  # (B, T-1, H)
            # The product kept in float32 even for a 16-bit model: rounding each role's logits
            # to bf16 costs the Delta-KD target 1.4e-3 nats/token (docs/BENCHMARKS.md).
            out = head.float32_logits(hidden.to(self.device), vocab=v)  # (B, T-1, V)
        else:
            raise DeltaKDError(
                f"the reference source returned no output for role {role!r} (it sent "
                f"{', '.join(self.roles) or 'nothing'}); configure that role for the source."
            )
        out = out.to(self.device, non_blocking=True)
        self._cache[role] = out
        return out


def _trim_sparse(target: Any, device: torch.device) -> Any:
    return target.map_positions(lambda t: t[:, :-1].to(device))
