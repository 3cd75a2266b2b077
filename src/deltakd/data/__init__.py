"""Datasets -> chat rows -> token ids with assistant masks; one vocabulary for all roles.

Public API::

    load_rows(spec, split=None, *, limit=None, seed=0) -> list[{"messages": [...], "answer": ...}]
    parse_spec(spec) -> DatasetSpec           # kind, target, default splits
    encode_chat(tokenizer, messages) -> (ids, assistant_mask)       # deltakd.data.tokenize
    encode_rows / ChatDataset / ChatCollator                         # deltakd.data.tokenize
    check_vocabulary / load_tokenizer / resolve_model_path           # deltakd.data.vocab

Dataset specs: `mini:instruct`, `mini:math`, a `.jsonl` file, `ultrachat:<hub name or path>`,
`openmath:<hub name or path>` (see `deltakd.data.specs`).
"""

from deltakd.data.specs import DatasetSpec, load_rows, parse_spec

__all__ = ["DatasetSpec", "load_rows", "parse_spec"]
