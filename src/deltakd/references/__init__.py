"""Where the frozen models' outputs come from: local models, teacher servers, or a cache.

The trainer talks to a `ReferenceSource` and does not care which one it has (docs/ARCHITECTURE.md §2).
"""

from deltakd.references.base import REFERENCE_ROLES, ReferenceBatch, ReferenceSource

__all__ = ["REFERENCE_ROLES", "ReferenceBatch", "ReferenceSource"]
