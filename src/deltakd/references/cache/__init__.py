"""Offline target cache (docs/ARCHITECTURE.md §2, source 3): sparse z* computed once, trained from often.

Public API (imported lazily so `deltakd --help` does not load torch)::

    from deltakd.references.cache import build_cache, CacheReferences, from_config

    build_cache(config)                      # `deltakd cache build CONFIG`: writes cache.dir
    src = CacheReferences("runs/x/target_cache", expected=None)
    src.fetch(key, batch).target             # SparseTarget of leading shape [B, T]
    from_config(config, roles, device)       # `references: cache` in `deltakd train`

The format is documented in `deltakd.references.cache.format`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CacheManifest", "CacheReader", "CacheReferences", "CacheSettings", "build_cache",
           "from_config", "read_manifest"]  # fmt: skip

_LAZY = {
    "CacheManifest": "deltakd.references.cache.format",
    "CacheSettings": "deltakd.references.cache.format",
    "read_manifest": "deltakd.references.cache.format",
    "CacheReader": "deltakd.references.cache.reader",
    "CacheReferences": "deltakd.references.cache.source",
    "from_config": "deltakd.references.cache.source",
    "build_cache": "deltakd.references.cache.build",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deltakd.references.cache' has no attribute {name!r}")
