"""deltakd: Delta Knowledge Distillation (arXiv 2509.14526) and the KD baselines.

    from deltakd import DeltaKDConfig, DeltaKDTrainer   # the notebook API (docs/USAGE.md)

Imported lazily so `deltakd --help` does not load torch.
"""

from __future__ import annotations

from typing import Any

from deltakd._requirements import check_requirements

__version__ = "0.1.0"

check_requirements()

__all__ = ["DeltaKDConfig", "DeltaKDTrainer", "TrainConfig", "__version__", "train"]

_LAZY = {
    "DeltaKDConfig": "deltakd.config",
    "TrainConfig": "deltakd.config",
    "DeltaKDTrainer": "deltakd.train.notebook",
    "train": "deltakd.train.api",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deltakd' has no attribute {name!r}")
