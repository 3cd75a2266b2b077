"""One vocabulary for all roles: model path resolution, tokenizer fingerprints, size checks.

Delta-KD adds and subtracts logits of different models token by token, so every role must
use the same tokenizer. Models often pad their embedding matrix beyond the tokenizer
(Qwen2.5-7B has 152064 rows, Qwen2.5-1.5B 151936, the tokenizer 151665 tokens): the padded
rows are never produced by the tokenizer, so the trainer slices every role's logits to the
tokenizer's size `V` (`logits[..., :V]`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltakd.errors import ConfigError, VocabularyError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def resolve_model_path(path: str) -> str:
    """`mini:<name>` / `mini2:<name>` -> the shipped mini world v1's / v2's `<name>` directory;
    anything else unchanged."""
    from deltakd.data.mini import model_spec_dir

    world_dir = model_spec_dir(path)
    if world_dir is not None:
        return str(world_dir)
    local = Path(path).expanduser()
    # A Hub id is `name` or `namespace/name`: a missing path with more parts can only be local,
    # so say so now instead of after the Hub client's retries.
    if not local.exists() and (path.startswith((".", "/", "~")) or len(Path(path).parts) > 2):
        raise ConfigError(f"model path {path!r} does not exist: check the path in the config.")
    return str(local) if local.exists() else path


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    resolved = resolve_model_path(path)
    try:
        tok = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load a tokenizer from {path!r}: {exc}. Set `tokenizer` to a "
            "directory with tokenizer files or a Hub name."
        ) from exc
    if tok.pad_token_id is None:
        # Padding positions are masked out of every loss, so any id works; eos is conventional.
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's vocabulary, merges and added tokens (not its template)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        h.update(
            json.dumps(
                {k: model.get(k) for k in ("type", "vocab", "merges")}, sort_keys=True
            ).encode()
        )
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    added = sorted((i, t.content) for i, t in tokenizer.added_tokens_decoder.items())
    h.update(json.dumps(added).encode())
    return h.hexdigest()


def _role_tokenizer(path: str, trust_remote_code: bool) -> Any | None:
    """The tokenizer stored with a role's model, or None when it has none.

    A local directory without tokenizer files has none; a Hub name is asked for its tokenizer
    (small files) and counts as having none when it cannot be fetched.
    """
    p = Path(path)
    if p.exists():
        if p.is_dir() and any((p / f).is_file() for f in _TOKENIZER_FILES):
            return load_tokenizer(path, trust_remote_code=trust_remote_code)
        return None
    try:
        return load_tokenizer(path, trust_remote_code=trust_remote_code)
    except ConfigError:
        return None


def _embedding_rows(path: str, trust_remote_code: bool) -> int | None:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(cfg, "vocab_size", None)


@dataclass
class VocabularyInfo:
    """`vocab_size`: tokens in the shared tokenizer (the sliced V); `rows[role]`: embedding rows."""

    vocab_size: int
    fingerprint: str
    rows: dict[str, int]


def check_vocabulary(
    tokenizer: Any, role_paths: Mapping[str, str], *, trust_remote_code: bool = False
) -> VocabularyInfo:
    """Check every role uses `tokenizer`'s vocabulary and has at least `len(tokenizer)` rows.

    A role directory that holds tokenizer files must hash the same (vocabulary, merges, added
    tokens). Raises VocabularyError naming the role and both sources.
    """
    fp = tokenizer_fingerprint(tokenizer)
    v = len(tokenizer)
    rows: dict[str, int] = {}
    for role, raw_path in role_paths.items():
        path = resolve_model_path(raw_path)
        other = _role_tokenizer(path, trust_remote_code)
        if other is not None and tokenizer_fingerprint(other) != fp:
            raise VocabularyError(
                f"role {role!r} ({raw_path}) has a different tokenizer from the run's "
                f"({len(other)} vs {v} tokens, or different merges/ids): Delta-KD combines "
                "logits token by token, so all roles must share one tokenizer. Use models "
                "of one family (e.g. Qwen2.5-7B and Qwen2.5-1.5B)."
            )
        n = _embedding_rows(path, trust_remote_code)
        if n is not None:
            if n < v:
                raise VocabularyError(
                    f"role {role!r} ({raw_path}) has {n} embedding rows but the tokenizer has {v} "
                    "tokens: the model cannot score every token. Use the tokenizer that belongs "
                    "to this model family."
                )
            rows[role] = n
    return VocabularyInfo(vocab_size=v, fingerprint=fp, rows=rows)
