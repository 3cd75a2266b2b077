"""Chat rows -> token ids + assistant masks, and the collator that pads them.

The tokenizer's own chat template renders each conversation. Which tokens are "assistant"
tokens (the ones the loss counts) is found in one of two ways:

1. the template marks them with `{% generation %}` (as TRL's assistant-only loss expects): the
   tokenizer returns the mask directly;
2. otherwise (Qwen2.5's and Llama 3's own templates), by rendering growing prefixes of the
   conversation: the text an assistant message adds after `add_generation_prompt=True` is its
   span, up to and including its end-of-turn token (so the student learns to stop) but not the
   whitespace the template writes after it (Qwen's `\n` after `<|im_end|>` is formatting, not
   something the model says), mapped to tokens through the fast tokenizer's offsets.

`encode_rows` tokenizes with `datasets.map` into Arrow (5 bytes per token, memory-mapped, not
Python lists). Datasets of `CACHE_MIN_ROWS` rows or more (or any, given `cache_dir`) are cached
on disk under a key of the tokenizer, its template, `max_length`, `truncation` and the rows'
contents: the first process of a node builds it (with `num_proc` workers) while the others wait
on a file lock, then all memory-map it. The cache is written to a temporary directory and
renamed into place, so a killed build leaves no half cache (the next run rebuilds it).

Rows longer than `max_length` are dropped by default (`truncation="drop"`; counted, with the
tokens they held); `truncate` keeps their first `max_length` tokens, so a cut reply has no
end-of-turn token and its row is marked `truncated`; `error` stops at the first such row.
A row the template cannot render stops the run before any step, naming its origin (spec,
split and row number in the split).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltakd.errors import DataError

logger = logging.getLogger("deltakd.data")

#: datasets of at least this many rows are tokenized into the on-disk cache by default
CACHE_MIN_ROWS = 2000
#: rows per `num_proc` worker below which extra workers cost more than they save
ROWS_PER_WORKER = 2000
_OK, _TOO_LONG, _NO_RESPONSE, _BAD = 0, 1, 2, 3
#: bump when the encoding changes, so old caches are not reused
_ENCODING_VERSION = 2


@dataclass
class EncodedRow:
    input_ids: list[int]
    assistant_mask: list[bool]
    truncated: bool


@dataclass
class EncodeStats:
    """How many rows (and tokens) were truncated / dropped while encoding."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_response: int = 0
    response_tokens: int = 0
    tokens: int = 0
    #: tokens the dropped-as-too-long rows held, and tokens cut off truncated rows
    dropped_tokens: int = 0
    truncated_tokens: int = 0
    dropped_rows: list[int] = field(default_factory=list)
    cache: str | None = None

    def summary(self) -> str:
        return (
            f"{self.kept}/{self.rows} rows kept, {self.truncated} truncated "
            f"({self.truncated_tokens} tokens cut), {self.dropped_too_long} dropped as too long "
            f"({self.dropped_tokens} tokens), {self.dropped_no_response} dropped "
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
        # The turn ends at its end-of-turn token; whitespace the template adds after it
        # (Qwen: "<|im_end|>\n") is never generated, so it is not a response token.
        spans.append((len(before), max(len(before), len(through.rstrip()))))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = []
    for start, end in enc["offset_mapping"]:
        mask.append(any(start < e and end > s for s, e in spans) if end > start else False)
    return ids, mask


def _encode_batch(
    batch: dict[str, list[Any]], *, tokenizer: Any, max_length: int, truncation: str
) -> dict[str, list[Any]]:
    """`datasets.map` worker: one output row per input row, with its status."""
    out: dict[str, list[Any]] = {
        k: [] for k in ("input_ids", "assistant_mask", "length", "status", "truncated", "error")
    }
    for messages in batch["messages"]:
        error = ""
        try:
            ids, mask = encode_chat(tokenizer, messages)
        except DataError as exc:
            ids, mask, error = [], [], str(exc)
        except Exception as exc:  # the template's own errors (jinja's raise_exception, ...)
            ids, mask, error = [], [], f"{type(exc).__name__}: {exc}"
        length, status, truncated = len(ids), _OK, False
        if error:
            status = _BAD
        elif length > max_length:
            if truncation == "truncate":
                ids, mask, truncated = ids[:max_length], mask[:max_length], True
            else:
                status = _TOO_LONG
        # Position 0 is never predicted, so a response token there does not count.
        if status == _OK and not any(mask[1:]):
            status = _NO_RESPONSE
        if status != _OK:
            ids, mask = [], []
        out["input_ids"].append(ids)
        out["assistant_mask"].append(mask)
        out["length"].append(length)
        out["status"].append(status)
        out["truncated"].append(truncated)
        out["error"].append(error)
    return out


class EncodedRows(Sequence[EncodedRow]):
    """The kept rows of `encode_rows`, read from Arrow on demand (memory-mapped when cached)."""

    def __init__(self, table: Any) -> None:
        self.table = table  # a datasets.Dataset with input_ids, assistant_mask, truncated

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> EncodedRow:  # type: ignore[override]
        if not isinstance(i, int):
            raise TypeError("EncodedRows takes one integer index")
        if i < 0:
            i += len(self)
        r = self.table[i]
        return EncodedRow(r["input_ids"], [bool(m) for m in r["assistant_mask"]], r["truncated"])

    def __iter__(self) -> Iterator[EncodedRow]:
        for batch in self.table.iter(batch_size=256):
            for ids, mask, cut in zip(
                batch["input_ids"], batch["assistant_mask"], batch["truncated"]
            ):
                yield EncodedRow(ids, [bool(m) for m in mask], cut)


def data_fingerprint(rows: Sequence[dict[str, Any]]) -> str:
    """SHA-256 of the rows' conversations (what tokenization reads) in order."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row["messages"], sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\x00")
    return h.hexdigest()


def cache_key(
    tokenizer: Any, rows: Sequence[dict[str, Any]], max_length: int, truncation: str
) -> str:
    """The tokenized cache's key: tokenizer, template, max_length, truncation, data."""
    from deltakd.data.vocab import tokenizer_fingerprint

    blob = json.dumps(
        {
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "template": getattr(tokenizer, "chat_template", None),
            "max_length": max_length,
            "truncation": truncation,
            "data": data_fingerprint(rows),
            "version": _ENCODING_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "deltakd_tokenized"


def _map(rows: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, truncation: str,
         num_proc: int | None, work_dir: Path | None) -> Any:  # fmt: skip
    import datasets

    table = datasets.Dataset.from_dict({"messages": [r["messages"] for r in rows]})
    kwargs: dict[str, Any] = {
        "batched": True,
        "batch_size": 64,
        "fn_kwargs": {"tokenizer": tokenizer, "max_length": max_length, "truncation": truncation},
        "remove_columns": ["messages"],
        "desc": "tokenizing",
        "features": datasets.Features(
            {
                "input_ids": datasets.List(datasets.Value("int32")),
                "assistant_mask": datasets.List(datasets.Value("bool")),
                "length": datasets.Value("int32"),
                "status": datasets.Value("int8"),
                "truncated": datasets.Value("bool"),
                "error": datasets.Value("string"),
            }
        ),
    }
    if num_proc and num_proc > 1:
        kwargs["num_proc"] = num_proc
    if work_dir is not None:
        kwargs["cache_file_name"] = str(work_dir / "encoded.arrow")
    else:
        kwargs["keep_in_memory"] = True
    with _quiet_progress(len(rows)):
        return table.map(_encode_batch, **kwargs)


class _quiet_progress:
    """datasets' progress bars only for datasets big enough to wait on."""

    def __init__(self, n: int) -> None:
        self.quiet = n < 5000

    def __enter__(self) -> None:
        import datasets

        self.was = datasets.is_progress_bar_enabled()
        if self.quiet:
            datasets.disable_progress_bars()

    def __exit__(self, *exc: Any) -> None:
        import datasets

        if self.was:
            datasets.enable_progress_bars()


def _tokenized(rows: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, truncation: str,
               cache_dir: Path | None, num_proc: int | None) -> tuple[Any, str | None]:  # fmt: skip
    """The per-row encoding table, from the on-disk cache when there is one."""
    if num_proc is None:
        num_proc = max(1, min(os.cpu_count() or 1, len(rows) // ROWS_PER_WORKER))
    if cache_dir is None:
        if len(rows) < CACHE_MIN_ROWS:
            return _map(rows, tokenizer, max_length, truncation, None, None), None
        cache_dir = default_cache_dir()
    import datasets
    from filelock import FileLock

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / f"tokenized-{cache_key(tokenizer, rows, max_length, truncation)}"
    # One process per node builds; the others block here until it is done, with no timeout
    # (a barrier's timeout would kill the waiting ranks on a large dataset).
    with FileLock(str(final) + ".lock"):
        if not (final / "state.json").is_file():
            for stale in cache_dir.glob(final.name + ".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)  # left by a killed build
            tmp = cache_dir / f"{final.name}.tmp-{os.getpid()}"
            work = tmp / "work"
            work.mkdir(parents=True)
            logger.info("tokenizing %d rows into %s (num_proc=%d)", len(rows), final, num_proc)
            table = _map(rows, tokenizer, max_length, truncation, num_proc, work)
            table.save_to_disk(str(tmp / "data"))
            del table
            shutil.rmtree(work)
            for f in (tmp / "data").iterdir():
                f.rename(tmp / f.name)
            (tmp / "data").rmdir()
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    return datasets.load_from_disk(str(final)), str(final)


def encode_rows(
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    *,
    max_length: int,
    truncation: str = "drop",
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
) -> tuple[EncodedRows, list[int], EncodeStats]:
    """Encode rows; returns (encoded rows, their indices in `rows`, stats).

    `truncation`: `drop` (default) skips rows longer than `max_length`, `truncate` keeps their
    first `max_length` tokens, `error` raises DataError naming the row. Rows left with no
    assistant token are dropped and counted (all rows dropped raises DataError). A row the
    chat template cannot render raises DataError naming its origin. `cache_dir`: where the
    tokenized cache lives (default: for `CACHE_MIN_ROWS` rows or more, under the `datasets`
    cache; smaller datasets are tokenized in memory). `num_proc`: tokenizing processes
    (default: one per `ROWS_PER_WORKER` rows, at most one per CPU).
    """
    if truncation not in ("truncate", "drop", "error"):
        raise DataError(f"truncation={truncation!r}: use truncate, drop or error.")
    rows = list(rows)
    stats = EncodeStats(rows=len(rows))
    if not rows:
        raise DataError("no rows to encode: the dataset (after `limit`) is empty.")
    table, stats.cache = _tokenized(
        rows, tokenizer, max_length, truncation,
        Path(cache_dir) if cache_dir is not None else None, num_proc,
    )  # fmt: skip
    cols = table.select_columns(["length", "status", "truncated"]).to_dict()
    status, length, cut = cols["status"], cols["length"], cols["truncated"]

    def origin(i: int) -> str:
        return rows[i].get("origin") or f"row {i + 1}"

    bad = next((i for i, s in enumerate(status) if s == _BAD), None)
    if bad is not None:
        error = table[bad]["error"]
        raise DataError(
            f"{origin(bad)}: the chat template cannot render this conversation ({error}); "
            "fix or remove the row (roles must be ones the template accepts)."
        )
    kept = [i for i, s in enumerate(status) if s == _OK]
    too_long = [i for i, s in enumerate(status) if s == _TOO_LONG]
    if truncation == "error" and too_long:
        i = too_long[0]
        raise DataError(
            f"{origin(i)} has {length[i]} tokens, more than max_length={max_length}; raise "
            "max_length or set truncation=truncate or truncation=drop."
        )
    stats.dropped_too_long = len(too_long)
    stats.dropped_tokens = sum(length[i] for i in too_long)
    stats.dropped_no_response = sum(1 for s in status if s == _NO_RESPONSE)
    stats.dropped_rows = [i for i, s in enumerate(status) if s != _OK]
    stats.kept = len(kept)
    stats.truncated = sum(1 for i in kept if cut[i])
    stats.truncated_tokens = sum(length[i] - max_length for i in kept if cut[i])
    stats.tokens = sum(min(length[i], max_length) for i in kept)
    encoded = EncodedRows(table.select(kept).select_columns(
        ["input_ids", "assistant_mask", "truncated"]))  # fmt: skip
    # Response tokens in chunks of Arrow rows, not a Python list per token.
    for batch in encoded.table.select_columns(["assistant_mask"]).iter(batch_size=1024):
        stats.response_tokens += sum(sum(m[1:]) for m in batch["assistant_mask"])
    if not kept:
        raise DataError(
            f"no usable rows: {stats.summary()}. Raise max_length or check that rows "
            "have assistant responses."
        )
    if stats.dropped_too_long or stats.truncated:
        logger.warning("max_length=%d: %s", max_length, stats.summary())
    return encoded, kept, stats


class ChatDataset(torch.utils.data.Dataset):
    """Encoded rows as a map-style dataset of dicts (`input_ids`, `assistant_mask`, `row_index`)."""

    def __init__(self, encoded: Sequence[EncodedRow], row_indices: Sequence[int]) -> None:
        # Kept as given: an `EncodedRows` stays in Arrow, read row by row.
        self.encoded = encoded
        self.row_indices = list(row_indices)

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.encoded[i]
        return {
            "input_ids": e.input_ids,
            "assistant_mask": e.assistant_mask,
            "row_index": self.row_indices[i],
            "truncated": e.truncated,
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
