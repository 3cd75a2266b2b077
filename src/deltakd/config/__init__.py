"""The training config: schema (`schema`, `sections`, `fields`), reading (`overrides`) and the
generated reference (`reference`). The bottom layer of deltakd (docs/ARCHITECTURE.md).

    from deltakd.config import TrainConfig, load_config
    config = load_config("configs/mini/delta_kd.yaml", ["output_dir=runs/x", "cache.k=64"])
"""

from __future__ import annotations

from deltakd.config.fields import Section
from deltakd.config.overrides import (
    config_from_dict,
    load_config,
    nest_overrides,
    parse_overrides,
    parse_scalar,
    save_config,
    split_override,
)
from deltakd.config.passthrough import DeltaKDConfig
from deltakd.config.schema import (
    DIVERGENCE_NAMES,
    PRECISIONS,
    REFERENCE_KINDS,
    REPORTERS,
    SCHEDULES,
    TrainConfig,
    field_names,
)
from deltakd.config.sections import CacheSection, PeftSection, ServersSection

__all__ = [
    "DIVERGENCE_NAMES",
    "PRECISIONS",
    "REFERENCE_KINDS",
    "REPORTERS",
    "SCHEDULES",
    "CacheSection",
    "DeltaKDConfig",
    "PeftSection",
    "Section",
    "ServersSection",
    "TrainConfig",
    "config_from_dict",
    "field_names",
    "load_config",
    "nest_overrides",
    "parse_overrides",
    "parse_scalar",
    "save_config",
    "split_override",
]
