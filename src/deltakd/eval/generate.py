"""Batched generation through the HF `generate` API.

Prompts are chat message lists rendered with the tokenizer's chat template
(`add_generation_prompt=True`), left-padded so every row's last prompt token sits at the same
position and the new tokens start together. Greedy by default; sampling takes temperature,
top_p and a seed. Generation stops at the tokenizer's eos and at `<|im_end|>` (the ChatML
end-of-turn marker), whichever the vocabulary has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deltakd.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Message = dict[str, str]

END_OF_TURN_TOKENS: tuple[str, ...] = ("<|im_end|>",)


@dataclass
class GenerationSettings:
    """How to decode. `do_sample=False` is greedy and ignores temperature/top_p/seed."""

    max_new_tokens: int = 128
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    #: `hf` or `vllm` (`deltakd.generation.vllm`; the model is then a path or a VLLMEngine)
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
        if self.backend not in ("hf", "vllm"):
            raise ConfigError(
                f"generation backend {self.backend!r} is not allowed: expected hf or vllm."
            )


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


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[Message] | str],
    settings: GenerationSettings | None = None,
    *,
    progress: bool = True,
) -> list[str]:
    """Generate one reply per prompt; returns the decoded new text, in input order.

    Prompts are sorted by length before batching (less padding) and the replies put back in
    input order, so the result does not depend on `batch_size` under greedy decoding.
    """
    import torch
    from tqdm.auto import tqdm

    settings = settings or GenerationSettings()
    if settings.backend == "vllm":
        from deltakd.generation.vllm import generate_batch

        return [
            g.text for g in generate_batch(model, tokenizer, prompts, settings, progress=progress)
        ]
    texts = render_prompts(tokenizer, prompts)
    if not texts:
        return []

    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        # Left padding is masked out, so any id works; eos is the usual choice.
        pad_id = stops[0] if stops else 0

    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)

    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "pad_token_id": pad_id,
        "eos_token_id": stops or None,
    }
    if settings.do_sample:
        gen_kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:
        # Explicit so a checkpoint's generation_config (e.g. sampling defaults) cannot
        # turn greedy evaluation into sampling.
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if settings.do_sample:
        torch.manual_seed(settings.seed)

    outputs: list[str] = [""] * len(texts)
    bar = tqdm(total=len(texts), desc="generate", unit="ex", disable=not progress, leave=False)
    try:
        for start in range(0, len(order), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)  # (B, T)
            attention = torch.zeros((len(idx), width), dtype=torch.long)  # (B, T)
            for row, i in enumerate(idx):
                ids = encoded[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids) :] = 1
            with torch.inference_mode():
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    **gen_kwargs,
                )  # (B, T + new)
            new = out[:, width:].tolist()
            for row, i in enumerate(idx):
                toks = new[row]
                # Cut at the first stop token; rows that finished early are padded after it.
                for j, t in enumerate(toks):
                    if t in stops:
                        toks = toks[:j]
                        break
                outputs[i] = tokenizer.decode(toks, skip_special_tokens=True).strip()
            bar.update(len(idx))
    finally:
        bar.close()
        if was_training:
            model.train()
    return outputs
