"""The `hf` generation backend: batched generation through the transformers `generate` API.

Prompts are chat message lists rendered with the tokenizer's chat template
(`add_generation_prompt=True`), left-padded so every row's last prompt token sits at the same
position and the new tokens start together. Greedy by default; sampling takes temperature,
top_p and a seed. Generation stops at the tokenizer's eos and at `<|im_end|>` (the ChatML
end-of-turn marker), whichever the vocabulary has. Called through `deltakd.generation.generate`
(`backend: hf`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from deltakd.generation import (
    Generation,
    GenerationSettings,
    Message,
    render_prompts,
    stop_token_ids,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[Message] | str],
    settings: GenerationSettings | None = None,
    *,
    progress: bool = True,
) -> list[Generation]:
    """Generate one reply per prompt, in input order.

    Prompts are sorted by length before batching (less padding) and the replies put back in
    input order, so the result does not depend on `batch_size` under greedy decoding.
    """
    import torch
    from tqdm.auto import tqdm

    settings = settings or GenerationSettings()
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

    outputs: list[Generation] = [Generation("", [], "length")] * len(texts)
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
                reason = "length"
                # Cut at the first stop token; rows that finished early are padded after it.
                for j, t in enumerate(toks):
                    if t in stops:
                        toks, reason = toks[:j], "stop"
                        break
                text = tokenizer.decode(toks, skip_special_tokens=True).strip()
                outputs[i] = Generation(text=text, token_ids=list(toks), finish_reason=reason)
            bar.update(len(idx))
    finally:
        bar.close()
        if was_training:
            model.train()
    return outputs
