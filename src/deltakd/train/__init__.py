"""Training: config schema, methods, the distillation trainer and `train(config)`.

Public API (imported lazily so `deltakd --help` does not load torch)::

    from deltakd.train import TrainConfig, TrainResult, load_config, train
    result = train(load_config("configs/mini/delta_kd.yaml", ["output_dir=runs/x"]))
"""

from __future__ import annotations

from typing import Any

__all__ = ["DeltaKDConfig", "DeltaKDTrainer", "TrainConfig", "TrainResult", "load_config",
           "register_method", "train"]  # fmt: skip

_LAZY = {
    "TrainConfig": "deltakd.config",
    "DeltaKDConfig": "deltakd.config",
    "DeltaKDTrainer": "deltakd.train.notebook",
    "load_config": "deltakd.config",
    "TrainResult": "deltakd.train.api",
    "train": "deltakd.train.api",
    "register_method": "deltakd.train.methods",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deltakd.train' has no attribute {name!r}")
