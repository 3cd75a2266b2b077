"""Pure tensor math for distillation: divergences, targets, sparse targets, chunked losses.

No I/O and no models here; nothing else in deltakd is imported (docs/ARCHITECTURE.md §3).
"""

from deltakd.losses.divergences import DIVERGENCES, per_position_divergence
from deltakd.losses.fused import fused_distill_loss
from deltakd.losses.heads import LogitHead
from deltakd.losses.kd import delta_kd_loss, kd_loss, parallelogram_loss
from deltakd.losses.sparse import SparseTarget, fit_tail_model, sparse_fkl_per_position
from deltakd.losses.targets import (
    PARALLELOGRAM_VARIANTS,
    ParallelogramVariant,
    delta_target,
    get_variant,
    parallelogram_target,
)

__all__ = [
    "DIVERGENCES",
    "PARALLELOGRAM_VARIANTS",
    "LogitHead",
    "ParallelogramVariant",
    "SparseTarget",
    "delta_kd_loss",
    "delta_target",
    "fit_tail_model",
    "fused_distill_loss",
    "get_variant",
    "kd_loss",
    "parallelogram_loss",
    "parallelogram_target",
    "per_position_divergence",
    "sparse_fkl_per_position",
]
