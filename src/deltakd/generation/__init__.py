"""Text generation backends (minimal stand-in on branch d15; the generation package of the
restructure — `Generation`, `GenerationSettings`, `generate`, `BACKENDS` — replaces this file
when the branches merge; `deltakd.generation.vllm` only uses the names below)."""

from __future__ import annotations

from dataclasses import dataclass

from deltakd.eval.generate import (
    END_OF_TURN_TOKENS,
    GenerationSettings,
    Message,
    render_prompts,
    stop_token_ids,
)


@dataclass
class Generation:
    """One reply: the decoded text (stripped, special tokens removed), the new token ids up to
    (not including) the stop token, and why it ended: `stop` or `length`."""

    text: str
    token_ids: list[int]
    finish_reason: str


__all__ = [
    "END_OF_TURN_TOKENS",
    "Generation",
    "GenerationSettings",
    "Message",
    "render_prompts",
    "stop_token_ids",
]
