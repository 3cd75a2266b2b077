"""The one interface every source of reference outputs implements.

A source answers, for a batch of token ids, the outputs of the frozen roles the run needs
(`teacher_ft`, `teacher_raw`, `student_raw`, and optionally extra teachers such as
`teacher_ft2`). Sources may answer with full logits, with last hidden states (the trainer then
applies each role's frozen output layer, a `LogitHead` from `lm_heads()` that reproduces the
model's own bias, scale and soft cap), or with a ready sparse target (the offline cache).

Pipelining: the trainer calls `prefetch(key, batch)` for batch k+1 before it trains on batch k
and `fetch(key, batch)` when it needs the outputs. A source that cannot prefetch (local models)
simply computes in `fetch`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from deltakd.losses.heads import LogitHead

# Frozen roles (docs/ARCHITECTURE.md §1). `student` is the live, trainable model and never a reference.
REFERENCE_ROLES: tuple[str, ...] = ("teacher_ft", "teacher_raw", "student_raw", "teacher_ft2")


@dataclass
class ReferenceBatch:
    """Reference outputs for one batch, aligned with the batch's `input_ids` ([B, T]).

    Exactly one of the three forms is filled for each role:
    - `logits[role]`: [B, T, V] logits (any float dtype);
    - `hidden[role]`: [B, T, H] last hidden states (after the final norm);
      logits = `lm_heads()[role].apply(hidden)`;
    - `target`: a precomputed sparse target for the whole batch (offline cache), an instance
      of `deltakd.losses.SparseTarget` of leading shape [B, T].
    """

    logits: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)
    target: object | None = None
    # Seconds the caller waited for this batch inside `fetch` (0 when it was ready).
    wait_seconds: float = 0.0


class ReferenceSource(abc.ABC):
    """A source of frozen-model outputs. Subclasses: local models, servers, cache."""

    #: roles this source answers for, e.g. ("teacher_ft", "teacher_raw", "student_raw")
    roles: tuple[str, ...] = ()

    def prefetch(self, key: int, batch: Mapping[str, torch.Tensor]) -> None:  # noqa: B027
        """Start computing outputs for `batch` (identified by `key`); default: nothing."""

    @abc.abstractmethod
    def fetch(self, key: int, batch: Mapping[str, torch.Tensor]) -> ReferenceBatch:
        """Return outputs for `batch`; blocks until they are ready.

        `batch` holds at least `input_ids` and `attention_mask` ([B, T] each).
        """

    def lm_heads(self) -> dict[str, LogitHead]:
        """The frozen output layer (`LogitHead`: [V, H] weight, bias, scale, soft cap) of each
        role answered as hidden states; default none. Consumers also accept a plain [V, H]
        weight here (`deltakd.losses.heads.as_logit_head`), for sources written before."""
        return {}

    def close(self) -> None:  # noqa: B027
        """Release processes, sockets and shared memory; safe to call twice."""

    def __enter__(self) -> ReferenceSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
