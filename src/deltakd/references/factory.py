"""`build_reference_source(config, roles, device, dtype)`: the configured `ReferenceSource`.

Used by `deltakd train` and by `deltakd cache build` (which reads `cache.source`), so both get
their frozen models' outputs the same way (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from deltakd.errors import ConfigError
from deltakd.references.base import ReferenceSource

#: `references:` kind -> "module:function" building a ReferenceSource from
#: `(config, roles, device)`. `local` is built here; the others live with their helpers.
SOURCE_FACTORIES: dict[str, str] = {
    "servers": "deltakd.references.client:from_config",
    "cache": "deltakd.references.cache:from_config",
}


def build_reference_source(
    config: Any, roles: tuple[str, ...], device: torch.device, dtype: torch.dtype
) -> ReferenceSource:
    """The source of the frozen roles' outputs that `config.references` names."""
    if config.references == "local":
        from deltakd.references.local import LocalReferences

        paths = {r: getattr(config, r) for r in roles}
        return LocalReferences(
            paths,
            dtype=dtype,
            device=device,
            trust_remote_code=config.trust_remote_code,
            hidden_states=config.fused_loss,
        )
    target = SOURCE_FACTORIES[config.references]
    module_name, _, fn_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"references: {config.references} is not available in this install "
            f"({exc}); use references: local."
        ) from exc
    return getattr(module, fn_name)(config, roles, device)
