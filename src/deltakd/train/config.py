"""The training config, kept importable here; it lives in `deltakd.config` (the bottom layer,
so the reference sources and the cache read it without importing `deltakd.train`)."""

from __future__ import annotations

from deltakd.config import *  # noqa: F403
from deltakd.config import __all__ as _config_all
from deltakd.config.reference import config_reference_markdown

__all__ = [*_config_all, "config_reference_markdown"]
