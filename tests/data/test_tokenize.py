"""Chat-template encoding: assistant masks, truncation accounting, collation."""

from __future__ import annotations

import pytest
import torch

from deltakd.data.tokenize import ChatCollator, encode_chat, encode_rows
from deltakd.data.vocab import load_tokenizer
from deltakd.errors import DataError

CHAT = [
    {"role": "user", "content": "what colour is the fox?"},
    {"role": "assistant", "content": "the fox is red."},
    {"role": "user", "content": "and the whale?"},
    {"role": "assistant", "content": "the whale is blue."},
]


@pytest.fixture(scope="module")
def tok(tiny_world):
    return load_tokenizer(str(tiny_world["tokenizer"]))


def _assistant_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_generation_tag_mask(tok):
    ids, mask = encode_chat(tok, CHAT)
    assert len(ids) == len(mask)
    assert (
        _assistant_text(tok, ids, mask) == "the fox is red.<|im_end|>the whale is blue.<|im_end|>"
    )


def test_prefix_rendering_mask_matches_generation_tags(tok):
    # A template without {% generation %} (like Qwen2.5's) uses prefix rendering instead.
    plain = load_tokenizer(tok.name_or_path)
    plain.chat_template = tok.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    ids, mask = encode_chat(plain, CHAT)
    ids_g, _ = encode_chat(tok, CHAT)
    assert ids == ids_g
    text = _assistant_text(plain, ids, mask)
    # The prefix method also counts the newline after <|im_end|> (part of the turn's text).
    assert text.replace("\n", "") == "the fox is red.<|im_end|>the whale is blue.<|im_end|>"


def test_truncation_modes_are_counted(tok):
    rows = [{"messages": CHAT}, {"messages": CHAT[:2]}]
    n_long = len(encode_chat(tok, CHAT)[0])
    n_short = len(encode_chat(tok, CHAT[:2])[0])
    max_len = (n_long + n_short) // 2 if n_short < n_long else n_long - 1
    enc, kept, stats = encode_rows(tok, rows, max_length=max_len, truncation="truncate")
    assert stats.truncated == 1 and kept == [0, 1] and len(enc[0].input_ids) == max_len
    enc, kept, stats = encode_rows(tok, rows, max_length=max_len, truncation="drop")
    assert (
        stats.dropped_too_long == 1 and kept == [1] and "1 dropped as too long" in stats.summary()
    )
    with pytest.raises(DataError, match=r"row 1 has \d+ tokens, more than max_length"):
        encode_rows(tok, rows, max_length=max_len, truncation="error")


def test_rows_without_response_tokens_left_are_dropped(tok):
    rows = [{"messages": CHAT[:2]}]
    with pytest.raises(DataError, match="no usable rows"):
        encode_rows(tok, rows, max_length=6)  # the prompt alone is longer than 6 tokens


def test_collator_pads_and_masks(tok):
    enc, kept, _ = encode_rows(tok, [{"messages": CHAT}, {"messages": CHAT[:2]}], max_length=512)
    batch = ChatCollator(pad_token_id=tok.pad_token_id)(
        [{"input_ids": e.input_ids, "assistant_mask": e.assistant_mask, "row_index": k}
         for e, k in zip(enc, kept)])  # fmt: skip
    b, t = batch["input_ids"].shape
    assert (b, t) == (2, len(enc[0].input_ids))
    n1 = len(enc[1].input_ids)
    assert batch["attention_mask"][1, n1:].sum() == 0 and batch["attention_mask"][1, :n1].all()
    assert not batch["assistant_mask"][1, n1:].any()
    assert torch.equal(batch["labels"] != -100, batch["assistant_mask"])
    assert batch["row_index"].tolist() == [0, 1]
