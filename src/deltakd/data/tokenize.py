"""Chat rows -> token ids + assistant masks, and the collator that pads them.

The tokenizer's own chat template renders each conversation. Which tokens are "assistant"
tokens (the ones the loss counts) is found in one of two ways:

1. the template marks them with `{% generation %}` (as TRL's assistant-only loss expects): the
   tokenizer returns the mask directly;
2. otherwise, by rendering growing prefixes of the conversation: the text an assistant message
   adds after `add_generation_prompt=True` is its span (this includes the end-of-turn token, so
   the student learns to stop), mapped to tokens through the fast tokenizer's offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deltakd.errors import DataError


@dataclass
class EncodedRow:
    input_ids: list[int]
    assistant_mask: list[bool]
    truncated: bool


@dataclass
class EncodeStats:
    """How many rows were truncated / dropped while encoding (reported by the trainer)."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_response: int = 0
    response_tokens: int = 0
    tokens: int = 0
    dropped_rows: list[int] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.kept}/{self.rows} rows kept, {self.truncated} truncated, "
            f"{self.dropped_too_long} dropped as too long, {self.dropped_no_response} dropped "
            f"with no response tokens left; {self.tokens} tokens, "
            f"{self.response_tokens} response tokens"
        )


def _has_generation_tags(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "{% generation %}" in template.replace("{%-", "{%")


def _render(tokenizer: Any, messages: Sequence[dict], **kw: Any) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, **kw)


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and a bool mask of assistant tokens."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "the tokenizer has no chat template: use an instruct tokenizer or set "
            "`tokenizer.chat_template` (e.g. ChatML) before training."
        )
    if _has_generation_tags(tokenizer):
        out = tokenizer.apply_chat_template(
            list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(out["input_ids"])
        mask = [bool(m) for m in out["assistant_masks"]]
        return ids, mask
    text = _render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1])
        if not text.startswith(through) or not through.startswith(before):
            raise DataError(
                "the chat template does not render conversations prefix-consistently, so the "
                "assistant tokens cannot be located; add `{% generation %}` / "
                "`{% endgeneration %}` around assistant content in the template."
            )
        spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = []
    for start, end in enc["offset_mapping"]:
        mask.append(any(start < e and end > s for s, e in spans) if end > start else False)
    return ids, mask


def encode_rows(
    tokenizer: Any, rows: Sequence[dict[str, Any]], *, max_length: int, truncation: str = "truncate"
) -> tuple[list[EncodedRow], list[int], EncodeStats]:
    """Encode rows; returns (encoded rows, their indices in `rows`, stats).

    `truncation`: `truncate` keeps the first `max_length` tokens, `drop` skips longer rows,
    `error` raises DataError naming the row. Rows left with no assistant token are dropped and
    counted (all rows dropped raises DataError).
    """
    stats = EncodeStats(rows=len(rows))
    encoded: list[EncodedRow] = []
    kept: list[int] = []
    from tqdm.auto import tqdm

    # Rendering a template is ~1 ms per row: show progress on real datasets, not on tiny ones.
    progress = tqdm(rows, desc="tokenizing", unit="row", disable=len(rows) < 5000)
    for i, row in enumerate(progress):
        ids, mask = encode_chat(tokenizer, row["messages"])
        truncated = len(ids) > max_length
        if truncated:
            if truncation == "error":
                raise DataError(
                    f"row {i + 1} has {len(ids)} tokens, more than max_length="
                    f"{max_length}; raise max_length or set truncation=truncate "
                    "or truncation=drop."
                )
            if truncation == "drop":
                stats.dropped_too_long += 1
                stats.dropped_rows.append(i)
                continue
            ids, mask = ids[:max_length], mask[:max_length]
        # Position 0 is never predicted, so a response token there does not count.
        if not any(mask[1:]):
            stats.dropped_no_response += 1
            stats.dropped_rows.append(i)
            continue
        stats.truncated += int(truncated)
        stats.tokens += len(ids)
        stats.response_tokens += sum(mask[1:])
        encoded.append(EncodedRow(ids, mask, truncated))
        kept.append(i)
    stats.kept = len(encoded)
    if not encoded:
        raise DataError(
            f"no usable rows: {stats.summary()}. Raise max_length or check that rows "
            "have assistant responses."
        )
    return encoded, kept, stats


class ChatDataset(torch.utils.data.Dataset):
    """Encoded rows as a map-style dataset of dicts (`input_ids`, `assistant_mask`, `row_index`)."""

    def __init__(self, encoded: Sequence[EncodedRow], row_indices: Sequence[int]) -> None:
        self.encoded = list(encoded)
        self.row_indices = list(row_indices)

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.encoded[i]
        return {
            "input_ids": e.input_ids,
            "assistant_mask": e.assistant_mask,
            "row_index": self.row_indices[i],
        }


@dataclass
class ChatCollator:
    """Right-pads a list of encoded rows into tensors.

    Output: `input_ids` (B, T) long, `attention_mask` (B, T) long, `assistant_mask` (B, T) bool,
    `labels` (B, T) long with −100 outside assistant tokens, `row_index` (B,) long.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        b = len(features)
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        amask = torch.zeros((b, length), dtype=torch.bool)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
            attention[i, :n] = 1
            amask[i, :n] = torch.tensor(f["assistant_mask"], dtype=torch.bool)
        labels = input_ids.masked_fill(~amask, -100)
        rows = torch.tensor([int(f.get("row_index", -1)) for f in features], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "assistant_mask": amask,
            "labels": labels,
            "row_index": rows,
        }
