"""Error types. Every message says what was wrong and what to do about it.

`deltakd.losses` stays free of package imports and raises plain `ValueError`s; everything
else raises one of these, and the command line prints them without a traceback.
"""

from __future__ import annotations


class DeltaKDError(Exception):
    """Base class for errors caused by the user's input or environment."""


class ConfigError(DeltaKDError, ValueError):
    """A config field has a bad value (the message names field, value and what is allowed)."""


class DataError(DeltaKDError, ValueError):
    """A dataset or row cannot be used (the message names the row and the reason)."""


class VocabularyError(DeltaKDError, ValueError):
    """The roles do not share one tokenizer / vocabulary."""


class ReferenceServerError(DeltaKDError, RuntimeError):
    """A teacher server died, hung, or replied with the wrong batch."""


class CacheError(DeltaKDError, RuntimeError):
    """An offline target cache does not match the run, or a shard is missing or corrupt."""


class NonFiniteError(DeltaKDError, FloatingPointError):
    """NaN or inf appeared in logits, a loss or a gradient."""
