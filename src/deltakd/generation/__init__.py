"""Text generation for every part of deltakd that needs it (SeqKD, on-policy, evaluation).

This package sits below `deltakd.train` and `deltakd.eval` (docs/ARCHITECTURE.md): it imports
only `deltakd.errors`, the backend names of `deltakd.config.sections` (the `generation:`
section's schema, the one place they are listed) and, inside functions, its backends. One backend-neutral entry point::

    from deltakd.generation import Generation, GenerationSettings, generate

    gens = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=64))
    gens[0].text, gens[0].token_ids, gens[0].finish_reason   # "stop" | "length"

A backend is a function registered by name in `BACKENDS` ("module:function", imported on
first use) with the signature of `deltakd.generation.hf.generate_batch`::

    fn(model, tokenizer, prompts: Sequence[Sequence[Message] | str],
       settings: GenerationSettings, *, progress: bool) -> list[Generation]

returning one `Generation` per prompt, in input order. `settings.backend` picks it
(`hf` here; `vllm` is the engine of `deltakd.generation.vllm` where installed). What `model`
is belongs to the backend: a loaded `transformers` model for `hf`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deltakd.config.sections import GENERATION_BACKENDS
from deltakd.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict[str, str]

#: Tokens that end an assistant turn besides the tokenizer's eos (ChatML's end-of-turn marker).
END_OF_TURN_TOKENS: tuple[str, ...] = ("<|im_end|>",)

#: backend name -> "module:function" (see the module docstring for the function's signature);
#: backend `name` is `deltakd.generation.<name>`
BACKENDS: dict[str, str] = {
    name: f"deltakd.generation.{name}:generate_batch" for name in GENERATION_BACKENDS
}


@dataclass
class GenerationSettings:
    """How to decode. `do_sample=False` is greedy and ignores temperature/top_p/seed.

    `backend` names the engine (`BACKENDS`); decoding settings mean the same on every one.
    """

    max_new_tokens: int = 128
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    backend: str = "hf"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(
                f"max_new_tokens={self.max_new_tokens}: must be >= 1 (e.g. --max-new-tokens 128)."
            )
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: must be >= 1 (e.g. --batch-size 8).")
        if self.do_sample and not (self.temperature > 0):
            raise ConfigError(
                f"temperature={self.temperature}: sampling needs a temperature > 0; "
                "use greedy decoding (do_sample=False) for temperature 0."
            )
        if not (0 < self.top_p <= 1):
            raise ConfigError(f"top_p={self.top_p}: must be in (0, 1].")
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"generation backend {self.backend!r} is not allowed: expected one of "
                f"{', '.join(BACKENDS)}."
            )


@dataclass
class Generation:
    """One reply: the decoded text (stripped, special tokens removed), the new token ids up to
    (not including) the stop token, and why it ended: `stop` (a stop token) or `length`
    (`max_new_tokens` reached)."""

    text: str
    token_ids: list[int]
    finish_reason: str


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end a reply: eos plus `<|im_end|>` when the vocabulary has it."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for tok in END_OF_TURN_TOKENS:
        if tok in vocab and vocab[tok] not in ids:
            ids.append(int(vocab[tok]))
    return ids


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[Message] | str]
) -> list[str]:
    """Chat-template each message list (plain strings become one user turn)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "the tokenizer has no chat template; save one with the tokenizer "
            "(tokenizer.chat_template = ...; tokenizer.save_pretrained(path))."
        )
    texts: list[str] = []
    for p in prompts:
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        texts.append(str(text))
    return texts


def backend(name: str) -> Callable[..., list[Generation]]:
    """The generate function of backend `name`, imported on first use."""
    target = BACKENDS.get(name)
    if target is None:
        raise ConfigError(
            f"generation backend {name!r} is not allowed: expected one of {', '.join(BACKENDS)}."
        )
    module_name, _, fn_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"generation backend {name!r} is not available in this install ({exc}); "
            "use backend hf, or install the backend's extra (docs/USAGE.md)."
        ) from exc
    return getattr(module, fn_name)


def generate(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[Message] | str],
    settings: GenerationSettings | None = None,
    *,
    progress: bool = True,
) -> list[Generation]:
    """One `Generation` per prompt, in input order, from the backend `settings.backend`."""
    settings = settings or GenerationSettings()
    return backend(settings.backend)(model, tokenizer, prompts, settings, progress=progress)


__all__ = [
    "BACKENDS",
    "END_OF_TURN_TOKENS",
    "Generation",
    "GenerationSettings",
    "Message",
    "backend",
    "generate",
    "render_prompts",
    "stop_token_ids",
]
