"""Chat-template encoding: assistant masks, truncation accounting, collation."""

from __future__ import annotations

import pytest
import torch

from deltakd.data.tokenize import ChatCollator, ChatDataset, encode_chat, encode_rows
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
    ids_g, mask_g = encode_chat(tok, CHAT)
    assert ids == ids_g
    # The newline the template writes after <|im_end|> is formatting, never generated: the
    # prefix method counts exactly the tokens the generation tags mark.
    assert mask == mask_g
    assert (
        _assistant_text(plain, ids, mask) == "the fox is red.<|im_end|>the whale is blue.<|im_end|>"
    )


def test_real_qwen_template_counts_the_turn_through_im_end_only(tok):
    """Qwen2.5-Instruct's own template (no generation tags, default system prompt)."""
    from deltakd.rehearse.shapes import QWEN_CHAT_TEMPLATE, QWEN_SYSTEM_PROMPT

    qwen = load_tokenizer(tok.name_or_path)
    qwen.chat_template = QWEN_CHAT_TEMPLATE
    ids, mask = encode_chat(qwen, CHAT)
    text = qwen.decode(ids)
    assert text.startswith(f"<|im_start|>system\n{QWEN_SYSTEM_PROMPT}<|im_end|>\n")
    assert (
        _assistant_text(qwen, ids, mask) == "the fox is red.<|im_end|>the whale is blue.<|im_end|>"
    )
    end = qwen.convert_tokens_to_ids("<|im_end|>")
    for i, t in enumerate(ids[:-1]):
        if t == end and mask[i]:
            assert not mask[i + 1]  # the "\n" after a reply's <|im_end|>


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


def test_rows_longer_than_max_length_are_dropped_by_default_with_their_tokens(tok):
    rows = [{"messages": CHAT}, {"messages": CHAT[:2]}]
    n_long = len(encode_chat(tok, CHAT)[0])
    n_short = len(encode_chat(tok, CHAT[:2])[0])
    _, kept, stats = encode_rows(tok, rows, max_length=n_long - 1)
    assert kept == [1] and stats.dropped_too_long == 1 and stats.dropped_tokens == n_long
    assert stats.tokens == n_short and f"({n_long} tokens)" in stats.summary()
    from deltakd.train.config import TrainConfig

    assert TrainConfig.__dataclass_fields__["truncation"].default == "drop"


def test_a_truncated_reply_is_marked_and_never_ends_on_a_stop(tok):
    """`truncate` only where asked: the cut reply keeps no end-of-turn token and is marked."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids, _ = encode_chat(tok, CHAT)
    cut = max(i for i, t in enumerate(ids) if t == end) - 1  # inside the last reply
    enc, kept, stats = encode_rows(tok, [{"messages": CHAT}], max_length=cut, truncation="truncate")
    (row,) = enc
    assert row.truncated and stats.truncated == 1 and stats.truncated_tokens == len(ids) - cut
    assert row.input_ids == ids[:cut] and row.input_ids[-1] != end and row.assistant_mask[-1]
    sample = ChatDataset(enc, kept)[0]
    assert sample["truncated"] is True


def test_a_row_the_template_rejects_names_its_split_and_row(tok, tmp_path):
    """A malformed row deep in a split stops encoding (before any step) with its origin."""
    import json

    strict = load_tokenizer(tok.name_or_path)
    strict.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    rows = [{"messages": CHAT[:2]} for _ in range(300)]
    rows[236] = {"messages": [CHAT[0], CHAT[0], CHAT[1]]}
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from deltakd.data import load_rows

    loaded = load_rows(str(path))
    assert loaded[236]["origin"] == f"{path} row 237"
    with pytest.raises(DataError, match=r"train\.jsonl row 237: the chat template cannot render"):
        encode_rows(strict, loaded, max_length=512)


def test_limit_draws_a_seeded_random_sample(tmp_path):
    """Of a Hub-style split (consecutive rows share a problem), not the first rows."""
    import datasets

    from deltakd.data import load_rows

    rows = [{"problem": f"p{i // 10}", "generated_solution": f"s{i}", "expected_answer": "1"}
            for i in range(100)]  # fmt: skip
    datasets.DatasetDict({"cot": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "om")
    )
    spec = f"openmath:{tmp_path / 'om'}"
    a = load_rows(spec, limit=10, sample_seed=1)
    b = load_rows(spec, limit=10, sample_seed=1)
    c = load_rows(spec, limit=10, sample_seed=2)
    assert a == b and a != c and len(a) == 10
    assert len({r["messages"][0]["content"] for r in a}) > 2  # the first 10 are one problem
    for r in a:  # each row knows where it came from
        n = int(r["origin"].rsplit(" ", 1)[1])
        assert r["messages"][1]["content"] == f"s{n - 1}"


def test_tokenized_cache_is_built_once_and_a_killed_build_leaves_nothing(
    tok, tmp_path, monkeypatch
):
    import deltakd.data.tokenize as tk

    rows = [{"messages": CHAT if i % 2 else CHAT[:2]} for i in range(40)]
    calls = []
    real = tk._encode_batch

    def dying(batch, **kw):
        calls.append(len(batch["messages"]))
        if len(calls) == 1:
            raise KeyboardInterrupt  # the run is killed while the cache is written
        return real(batch, **kw)

    monkeypatch.setattr(tk, "_encode_batch", dying)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        encode_rows(tok, rows, max_length=512, cache_dir=cache, num_proc=1)
    assert not [p for p in cache.iterdir() if p.is_dir() and ".tmp-" not in p.name]
    enc, kept, stats = encode_rows(tok, rows, max_length=512, cache_dir=cache, num_proc=1)
    built = [p for p in cache.iterdir() if p.is_dir()]
    assert len(built) == 1 and stats.cache == str(built[0])  # the stale partial one is gone
    n_calls = len(calls)
    again, kept2, stats2 = encode_rows(tok, rows, max_length=512, cache_dir=cache, num_proc=1)
    assert len(calls) == n_calls  # read from the cache, not tokenized again
    assert kept2 == kept and [e.input_ids for e in again] == [e.input_ids for e in enc]
    assert stats2.response_tokens == stats.response_tokens
    encode_rows(tok, rows, max_length=256, cache_dir=cache, num_proc=1)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2  # keyed by max_length
    # in memory (no cache) gives the same rows
    mem, _, _ = encode_rows(tok, rows, max_length=512)
    assert [e.input_ids for e in mem] == [e.input_ids for e in enc]
