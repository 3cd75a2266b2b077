"""Dataset specs -> chat rows `{"messages": [...], "answer": ...}`.

Specs (one string, as in a config's `dataset:`):

- `mini:instruct`, `mini:math`: the miniature world's tasks (splits train / validation / test).
- a local JSONL file (`*.jsonl` / `*.json` lines): rows with `messages`, or `prompt` and
  `response` (optionally `system`, `answer`). `{split}` in the path is replaced by the split.
- `ultrachat:<hub name or path>`: ultrachat_200k rows (`messages`; splits `train_sft`,
  `test_sft`, ...), e.g. `ultrachat:HuggingFaceH4/ultrachat_200k`.
- `openmath:<hub name or path>`: OpenMathReasoning rows (`problem`, `generated_solution`,
  optional `expected_answer`; splits `cot`, `tir`, ...), e.g. `openmath:nvidia/OpenMathReasoning`.
- a mixture `SPEC+SPEC[+...]`, e.g. `mini:instruct+mini:math`: the parts' rows interleaved
  round-robin (so every batch sees every task); each part uses its own default split unless a
  split is given.

Hub names and directories go through `datasets.load_dataset` (or `load_from_disk` for a
directory written by `save_to_disk`), which prepares only the split asked for: a repo whose
README maps splits to data files (ultrachat_200k, OpenMathReasoning) is loaded with just that
split's files, so `train_split: cot` never downloads or converts OpenMathReasoning's other
splits. Offline (`HF_HUB_OFFLINE=1`), `load_dataset` reads what an earlier online load
prepared. `.jsonl` files are read line by line so a bad line is reported with its number.

`limit` draws a seeded random sample of a Hub / Arrow / parquet split (OpenMathReasoning
keeps the ~10 solutions of a problem in consecutive rows, so the first rows would be a handful
of problems); a JSONL file of your own keeps its first `limit` rows. Every
row carries `origin` ("<spec> split '<split>' row <n>", n counted from 1 in the split), so an
error found later (e.g. by the chat template) names the row in its source.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltakd.errors import DataError

ROLES = ("system", "user", "assistant", "tool")

#: spec kind -> default training split
DEFAULT_TRAIN_SPLIT = {
    "mini": "train",
    "ultrachat": "train_sft",
    "openmath": "cot",
    "jsonl": "train",
}
#: spec kind -> default evaluation split
DEFAULT_EVAL_SPLIT = {"mini": "test", "ultrachat": "test_sft", "openmath": "cot", "jsonl": "test"}


MIX_SEPARATOR = "+"


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset spec: `kind` in mini / jsonl / ultrachat / openmath / mix, its target,
    and for a mixture its parts."""

    kind: str
    target: str
    parts: tuple[DatasetSpec, ...] = ()

    @property
    def text(self) -> str:
        """The spec string this was parsed from (normalised)."""
        return self.target if self.kind in ("jsonl", "mix") else f"{self.kind}:{self.target}"

    @property
    def default_train_split(self) -> str | None:
        """The default training split; for a mixture, the parts' common one (None: each its own)."""
        if self.kind == "mix":
            return _common({p.default_train_split for p in self.parts})
        return DEFAULT_TRAIN_SPLIT[self.kind]

    @property
    def default_eval_split(self) -> str | None:
        if self.kind == "mix":
            return _common({p.default_eval_split for p in self.parts})
        return DEFAULT_EVAL_SPLIT[self.kind]


def _common(values: set[str | None]) -> str | None:
    return next(iter(values)) if len(values) == 1 else None


def parse_spec(spec: str) -> DatasetSpec:
    """Parse a dataset spec string (see the module docstring)."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(
            f"dataset spec {spec!r} is empty: use e.g. `mini:instruct` or a .jsonl path."
        )
    spec = spec.strip()
    if MIX_SEPARATOR in spec and not Path(spec).exists():
        pieces = [p.strip() for p in spec.split(MIX_SEPARATOR)]
        if any(not p for p in pieces):
            raise DataError(
                f"dataset spec {spec!r} has an empty part around {MIX_SEPARATOR!r}: write a "
                "mixture as e.g. `mini:instruct+mini:math`."
            )
        return DatasetSpec("mix", spec, tuple(parse_spec(p) for p in pieces))
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("mini", "ultrachat", "openmath"):
        if not rest:
            raise DataError(
                f"dataset spec {spec!r} names no dataset after {kind + ':'!r}: "
                f"e.g. `{kind}:{_example(kind)}`."
            )
        if kind == "mini":
            from deltakd.data.mini import MINI_TASKS

            if rest not in MINI_TASKS:
                raise DataError(
                    f"dataset spec {spec!r}: unknown mini task {rest!r}; "
                    f"use one of {', '.join('mini:' + t for t in MINI_TASKS)}."
                )
        return DatasetSpec(kind, rest)
    if spec.endswith((".jsonl", ".json", ".jsonl.gz")) or "{split}" in spec:
        return DatasetSpec("jsonl", spec)
    raise DataError(
        f"dataset spec {spec!r} is not recognised: use `mini:instruct`, `mini:math`, a .jsonl "
        "file, `ultrachat:<hub name or path>` or `openmath:<hub name or path>`."
    )


def _example(kind: str) -> str:
    return {
        "mini": "instruct",
        "ultrachat": "HuggingFaceH4/ultrachat_200k",
        "openmath": "nvidia/OpenMathReasoning",
    }[kind]


def load_rows(
    spec: str,
    split: str | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
    sample_seed: int = 0,
) -> list[dict[str, Any]]:
    """Load a dataset as chat rows `{"messages": [{"role", "content"}, ...], "answer": str|None,
    "origin": str}`.

    Args:
        spec: a dataset spec (module docstring).
        split: split name; None = the spec's default training split.
        limit: for Hub datasets, parquet/arrow files and `save_to_disk` directories, a random
            sample of `limit` rows (seeded by `sample_seed`, kept in split order); JSONL files
            and the mini world's tasks (generated shuffled) keep their first `limit` rows.
        seed: seed of the mini world (ignored elsewhere).
        sample_seed: seed of the `limit` sample.

    Raises DataError naming the row (1-based line or row number) for malformed rows, and for
    empty datasets, unreadable files and missing splits.
    """
    parsed = parse_spec(spec)
    if parsed.kind == "mix":
        groups = [
            load_rows(part.text, split, seed=seed, sample_seed=sample_seed) for part in parsed.parts
        ]
        # Round-robin, so that a prefix (`limit`, a short run) still holds every part.
        mixed = [row for tier in itertools.zip_longest(*groups) for row in tier if row is not None]
        return mixed[:limit] if limit is not None else mixed
    split = split or parsed.default_train_split
    if parsed.kind == "mini":
        from deltakd.data.mini import load_task

        rows = load_task(parsed.target, split, seed=seed, limit=limit)
        source = f"mini:{parsed.target} split {split!r}"
        out = [normalise_row(r, i + 1, source) for i, r in enumerate(rows)]
    elif parsed.kind == "jsonl":
        path = Path(parsed.target.replace("{split}", split))
        # A file of your own keeps its first `limit` rows (read no further).
        out = [normalise_row(r, n, str(path)) for n, r in _read_jsonl(path, limit)]
    else:
        records, numbers = _load_hf(parsed, split, limit, sample_seed)
        source = f"{parsed.kind}:{parsed.target} split {split!r}"
        convert = _ultrachat_row if parsed.kind == "ultrachat" else _openmath_row
        out = [convert(r, n, source) for r, n in zip(records, numbers)]
    if limit is not None:
        out = out[:limit]
    if not out:
        raise DataError(
            f"dataset {spec!r} split {split!r} has no rows: point `dataset` at a "
            "non-empty file or split."
        )
    return out


# --- readers -------------------------------------------------------------------------------


def _read_jsonl(path: Path, limit: int | None = None) -> Iterable[tuple[int, Any]]:
    if not path.is_file():
        raise DataError(
            f"dataset file {path} does not exist: check the `dataset` path (and `{{split}}` in it)."
        )
    rows: list[tuple[int, Any]] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}: line {lineno} is not UTF-8 ({exc.reason} at byte "
                    f"{exc.start}); re-encode the file as UTF-8."
                ) from None
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: line {lineno} is not valid JSON ({exc.msg} at column "
                    f"{exc.colno}); fix or remove that line."
                ) from None
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _load_hf(
    spec: DatasetSpec, split: str, limit: int | None, sample_seed: int = 0
) -> tuple[Any, list[int]]:
    """(records, their 1-based row numbers in the split) of a file, directory or Hub dataset."""
    import datasets

    target = spec.target
    path = Path(target)
    try:
        if path.is_file():
            if path.suffix in (".jsonl", ".json"):
                lines = list(_read_jsonl(path, limit))
                return [r for _, r in lines], [n for n, _ in lines]
            builder = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}.get(path.suffix)
            if builder is None:
                raise DataError(
                    f"{path}: unsupported file type {path.suffix!r}; use .jsonl, "
                    ".parquet or a datasets directory."
                )
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif path.is_dir() and (
            (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
        ):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(
                        f"{path} has no split {split!r}; it has "
                        f"{', '.join(loaded)}. Set `train_split`."
                    )
                ds = loaded[split]
            else:
                ds = loaded
        else:
            ds = _load_one_split(target, split)
    except DataError:
        raise
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(
            f"cannot load dataset {spec.kind}:{target} split {split!r}: {exc}. Check "
            "the name/path and the split (`train_split`)."
        ) from exc
    except Exception as exc:  # datasets raises many types (hub, connection, builder errors)
        raise DataError(
            f"cannot load dataset {spec.kind}:{target} split {split!r}: "
            f"{type(exc).__name__}: {exc}. Check the name, the split and that the "
            "Hub is reachable (or pass a local path; offline, `HF_HUB_OFFLINE=1` reads what "
            "an earlier online load prepared)."
        ) from exc
    picked = list(range(len(ds)))
    if limit is not None and limit < len(ds):
        picked = sorted(random.Random(sample_seed).sample(picked, limit))
        ds = ds.select(picked)
    return ds, [i + 1 for i in picked]


def _load_one_split(target: str, split: str) -> Any:
    """`load_dataset(target, split=split)`, preparing only that split where the repo says which
    files hold it (`load_dataset` alone downloads and converts every split first)."""
    import datasets

    builder = datasets.load_dataset_builder(target)
    files = getattr(builder.config, "data_files", None)
    if files and split in files and len(files) > 1:
        return datasets.load_dataset(target, data_files={split: list(files[split])}, split=split)
    if files and split not in files:
        raise DataError(
            f"dataset {target} has no split {split!r}; it has {', '.join(files)}. "
            "Set `train_split` (or the eval split)."
        )
    return datasets.load_dataset(target, split=split)


# --- row conversion ------------------------------------------------------------------------


def _row_error(source: str, n: int, reason: str, fix: str) -> DataError:
    return DataError(f"{source}: row {n} {reason}; {fix}.")


def normalise_row(row: Any, n: int, source: str) -> dict[str, Any]:
    """Validate one row (`messages`, or `prompt` + `response`) -> `{"messages", "answer"}`."""
    if not isinstance(row, Mapping):
        raise _row_error(
            source,
            n,
            f"is a {type(row).__name__}, not an object",
            'write one JSON object per line, e.g. {"prompt": ..., "response": ...}',
        )
    answer = row.get("answer")
    if "messages" in row:
        messages = _check_messages(row["messages"], n, source)
    elif "prompt" in row and "response" in row:
        for key in ("prompt", "response"):
            if not isinstance(row[key], str):
                raise _row_error(
                    source,
                    n,
                    f"has a non-string {key!r} ({type(row[key]).__name__})",
                    f"make {key!r} a string",
                )
        messages = []
        if row.get("system"):
            messages.append({"role": "system", "content": str(row["system"])})
        messages += [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["response"]},
        ]
        if not row["response"].strip():
            raise _row_error(source, n, "has an empty 'response'", "remove the row or fill it in")
    else:
        raise _row_error(
            source,
            n,
            f"has neither 'messages' nor 'prompt'+'response' (keys: "
            f"{', '.join(map(str, row)) or 'none'})",
            "give each row a `messages` list or `prompt` and `response` strings",
        )
    if answer is not None and not isinstance(answer, str):
        answer = str(answer)
    return {"messages": messages, "answer": answer, "origin": f"{source} row {n}"}


def _check_messages(messages: Any, n: int, source: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise _row_error(
            source,
            n,
            "has an empty or non-list 'messages'",
            "make it a list of {role, content} objects",
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise _row_error(
                source,
                n,
                f"message {i} lacks 'role' or 'content'",
                "give every message a role and a content string",
            )
        if m["role"] not in ROLES:
            raise _row_error(
                source, n, f"message {i} has role {m['role']!r}", f"use one of {', '.join(ROLES)}"
            )
        if not isinstance(m["content"], str):
            raise _row_error(
                source, n, f"message {i} has non-string content", "make every content a string"
            )
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise _row_error(
            source,
            n,
            "has no assistant turn, so there is nothing to learn",
            "add an assistant message or remove the row",
        )
    return out


def _ultrachat_row(row: Mapping[str, Any], n: int, source: str) -> dict[str, Any]:
    if "messages" not in row:
        raise _row_error(
            source,
            n,
            f"has no 'messages' (keys: {', '.join(row)})",
            "use an ultrachat_200k-style dataset or a JSONL spec",
        )
    return normalise_row({"messages": row["messages"]}, n, source)


def _openmath_row(row: Mapping[str, Any], n: int, source: str) -> dict[str, Any]:
    if "problem" not in row or "generated_solution" not in row:
        raise _row_error(
            source,
            n,
            f"lacks 'problem' or 'generated_solution' (keys: {', '.join(row)})",
            "use an OpenMathReasoning-style dataset",
        )
    answer = row.get("expected_answer")
    return normalise_row(
        {"prompt": row["problem"], "response": row["generated_solution"], "answer": answer},
        n,
        source,
    )


# --- plain text (pretraining corpora) --------------------------------------------------------

#: Plain-text specs for `load_texts` (MiniLLM's pretraining term, `method_args.pt_dataset`).
TEXT_SPECS = '`mini:corpus` (world v1), `mini2:corpus` (world v2), a .txt file (one document per non-empty line) or a .jsonl file of {"text": ...} rows'


def check_text_spec(spec: str) -> None:
    """Refuse (DataError) a plain-text spec `load_texts` cannot read, before any loading."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"text dataset spec {spec!r} is empty: use {TEXT_SPECS}.")
    spec = spec.strip()
    if spec in ("mini:corpus", "mini2:corpus") or spec.endswith((".txt", ".jsonl")):
        return
    raise DataError(f"text dataset spec {spec!r} is not recognised: use {TEXT_SPECS}.")


def load_texts(spec: str, *, limit: int | None = None, seed: int = 0) -> list[str]:
    """Plain-text documents for a language-modelling loss (no chat format).

    `mini:corpus` is the mini world's pretraining corpus: the documents the shipped world's
    raw models were pretrained on (`deltakd.data.mini.corpus.make_corpus` at the world's
    `seed` and full scale). `mini2:corpus` is world v2's (`make_corpus_v2` with the seed, size
    and chat share its world.json records; it never holds a validation or test prompt).
    `limit` keeps the first documents.
    """
    check_text_spec(spec)
    spec = spec.strip()
    if spec == "mini:corpus":
        from deltakd.data.mini.build import SCALES
        from deltakd.data.mini.corpus import make_corpus

        texts = make_corpus(seed, n_docs=SCALES["full"].corpus_docs)
    elif spec == "mini2:corpus":
        from deltakd.data.mini import mini_world_dir
        from deltakd.data.mini.corpus import make_corpus_v2

        info = json.loads((mini_world_dir("v2") / "world.json").read_text(encoding="utf-8"))
        build = info["build"]
        texts = make_corpus_v2(
            info["seed"], n_docs=build["corpus_docs"], chat_share=build["chat_share"]
        )
    elif spec.endswith(".txt"):
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"text file {path} does not exist: check the path.")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        texts = []
        for n, row in _read_jsonl(Path(spec)):
            if not isinstance(row, Mapping) or not isinstance(row.get("text"), str):
                raise DataError(f"{spec}: line {n} has no string field 'text'; each line must "
                                'be {"text": "..."}.')  # fmt: skip
            texts.append(row["text"])
    texts = [t for t in texts if t][:limit]
    if not texts:
        raise DataError(f"text dataset {spec!r} has no documents: point it at a non-empty file.")
    return texts
