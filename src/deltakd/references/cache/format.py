"""The on-disk format of an offline target cache: settings, encoding, manifest, fingerprints.

A cache is a directory::

    manifest.json                 what the targets are, for which models/data, and the shards
    shard-00000.safetensors       rows [0, R) of the (deduplicated) training set
    shard-00001.safetensors       rows [R, 2R) ...

Each shard holds, for its rows, every *response position* t (the positions whose next token
t + 1 is an assistant token, i.e. where the trainer's mask is True) and there the top-k of the
target distribution `softmax(z / τ)` plus the tail mass `1 − Σ top-k`:

    row_keys     uint8   (R, 16)   blake2b-128 of the row's token ids (int32 little endian)
    row_index    int64   (R,)      the row's index in the loaded dataset (for messages)
    row_offsets  int64   (R + 1,)  row r owns positions [row_offsets[r], row_offsets[r + 1])
    positions    int32   (N,)      t within the row (the target at t scores token t + 1)
    indices      uint16 (N, k) / uint8 (N, k, 3) / int32 (N, k)  token ids of the top-k, most
                 probable first (uint24 = 3 little-endian bytes, for vocabularies up to 2^24)
    logprobs     fp16 / bf16 / fp32 (N, k)  their log-probabilities at temperature τ
    tail_mass    fp32    (N,)      1 − Σ exp(logprobs), computed in float32 before rounding
    tail_coeffs  fp16 / bf16 / fp32 (N, r)  only with `cache.tail_rank` r > 0: the position's
                 coordinates in the tail model (`deltakd.losses.fit_tail_model`)

With a tail model the directory also holds `tail_model.safetensors` (basis (r, V) and offset
(V,), float32, fitted once on the first `cache.tail_fit_positions` response positions); the
trainer then spreads each position's tail mass like the dense target instead of as one bucket.

**Format version 2** (`cache.index_dtype: packed` and/or `cache.value_dtype: q4 … q8`, see
`deltakd.references.cache.packing`) stores the same targets in fewer bytes: each position's
entries in ascending id order, the ids Elias–Fano coded (`indices` (N, B) uint8 and
`ef_universe` (1,) int64) and the values as b-bit levels (`logprobs` (N, ⌈k·b/8⌉) uint8); the
tail mass in fp16; the tail-model coefficients in fp16, or with quantised values in int8
(`tail_coeffs`) scaled per component by `tail_coeff_scale` float32 (r,) (the component's largest
|c| in the shard, at level 127); and
instead of `positions`, the runs of consecutive positions of each row (`span_start`,
`span_length` int32 (S,), `row_spans` int64 (R + 1,)). The reader gives back the same tensors
as for version 1 (entries most probable first). Version-1 caches stay readable; a reader older than version 2
refuses a version-2 cache and says to rebuild it.

Rows are found by the hash of their token ids, so the trainer passes nothing but the batch it
already has; identical rows share one entry. Bytes per response token are
`k · (index bytes + value bytes) + r · value bytes + 4 (tail) + 4 (position)` plus 40 bytes
per row.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltakd.errors import CacheError, ConfigError

FORMAT_NAME = "deltakd-target-cache"
FORMAT_VERSION = 1
#: the version of caches with a packed encoding (`is_packed`); readers accept both
PACKED_FORMAT_VERSION = 2
READABLE_VERSIONS = (FORMAT_VERSION, PACKED_FORMAT_VERSION)
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
TAIL_MODEL_NAME = "tail_model.safetensors"
ROW_KEY_BYTES = 16

#: value dtypes the cache can store the log-probabilities in -> bytes per value
VALUE_DTYPES: dict[str, int] = {"fp16": 2, "bf16": 2, "fp32": 4}
#: quantised value dtypes (format version 2) -> bits per value
QUANTISED_VALUES: dict[str, int] = {"q4": 4, "q5": 5, "q6": 6, "q7": 7, "q8": 8}
#: index dtypes -> bytes per index; `auto` picks the narrowest that holds every id of V;
#: `packed` (format version 2) is Elias–Fano coded, its width depends on V and k
INDEX_DTYPES: dict[str, int] = {"uint16": 2, "uint24": 3, "int32": 4, "packed": 0}
_INDEX_LIMITS: dict[str, int] = {"uint16": 1 << 16, "uint24": 1 << 24, "int32": 1 << 31,
                                 "packed": 1 << 31}  # fmt: skip
#: methods whose target is a fixed function of the frozen models (so it can be cached)
CACHEABLE_METHODS: tuple[str, ...] = ("kd", "delta_kd", "parallelogram")


def _torch_dtype(name: str) -> Any:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
            "uint16": torch.uint16, "int32": torch.int32}[name]  # fmt: skip


def resolve_index_dtype(name: str, vocab_size: int) -> str:
    """`auto` -> uint16 for V <= 65536, uint24 (3 bytes, e.g. Qwen's 151665) up to 2^24, else
    int32; an explicit choice too narrow for V is refused."""
    if name == "auto":
        return next(n for n, limit in _INDEX_LIMITS.items() if vocab_size <= limit)
    if vocab_size > _INDEX_LIMITS[name]:
        raise ConfigError(f"config field 'cache.index_dtype' = {name!r} cannot hold token ids of a "
                          f"{vocab_size}-token vocabulary (max {_INDEX_LIMITS[name]}): use a wider "
                          "one or auto.")  # fmt: skip
    return name


def is_packed(index_dtype: str, value_dtype: str) -> bool:
    """Whether these encodings make a format-version-2 shard (`packing`)."""
    return index_dtype == "packed" or value_dtype in QUANTISED_VALUES


def bytes_per_position(k: int, index_dtype: str, value_dtype: str, tail_rank: int = 0,
                       vocab_size: int | None = None) -> int:  # fmt: skip
    """Bytes one response position costs in a shard (indices + logprobs + tail-model
    coefficients + tail mass + position). Packed ids need `vocab_size` (their width is that of
    a shard whose largest id is V − 1, the most they take); packed shards store positions as
    runs per row, counted with the row table, not here."""
    if is_packed(index_dtype, value_dtype):
        from deltakd.references.cache.packing import ef_bytes

        if index_dtype == "packed":
            if vocab_size is None:
                raise ValueError("bytes_per_position: packed ids need vocab_size")
            ids = ef_bytes(vocab_size, k)
        else:
            ids = k * INDEX_DTYPES[index_dtype]
        bits = QUANTISED_VALUES.get(value_dtype)
        values = (k * bits + 7) // 8 if bits else k * VALUE_DTYPES[value_dtype]
        coeffs = tail_rank if bits else 2 * tail_rank
        return ids + values + coeffs + 2
    return (
        k * (INDEX_DTYPES[index_dtype] + VALUE_DTYPES[value_dtype])
        + tail_rank * VALUE_DTYPES[value_dtype]
        + 4
        + 4
    )


# --- settings (the `cache:` mapping of the training config) ----------------------------------


@dataclass
class CacheSettings:
    """The `cache:` settings of a TrainConfig (`cache.KEY=VALUE` on the command line).

    Attributes:
        dir: cache directory. Default `<output_dir>/target_cache`.
        k: top-k entries kept per position (`V` or `0` = the whole vocabulary).
        value_dtype: fp16 (default), bf16 or fp32 log-probabilities, or q6 / q7 / q8: b-bit
            levels of (p / p_max)^(1/3) (format version 2, `packing`).
        index_dtype: auto (uint16 when V <= 65536, uint24 up to 2^24, else int32), uint16,
            uint24, int32, or packed: Elias–Fano coded id sets (format version 2; 106 bytes
            for k = 64 of V = 151936 where uint24 takes 192).
        rows_per_shard: rows per shard file (the unit of resume).
        batch_size: rows per reference forward pass while building (default: the config's
            per_device_batch_size).
        source: where `deltakd cache build` gets the frozen models' outputs: local or servers.
        tail_rank: r > 0 stores r coefficients per position of a low-rank model of the target's
            tail (PCA of its log-probabilities), so the tail mass is spread like the dense
            target's instead of as one bucket: r · value bytes more per position, much lower
            KL to the dense target (docs/BENCHMARKS.md). 0 (default): tail bucket only.
        tail_fit_positions: response positions (from the first rows) the tail model is fitted
            on; the fit holds a (positions, V) float64 matrix in memory.
        verify: check each shard's sha256 the first time a run reads it.
        verify_dataset: at train start, tokenize the dataset and compare its hash with the
            cache's (rows missing from the cache are refused at fetch time either way).
    """

    dir: str = ""
    k: int | str = 64
    value_dtype: str = "fp16"
    index_dtype: str = "auto"
    rows_per_shard: int = 1024
    batch_size: int | None = None
    source: str = "local"
    tail_rank: int = 0
    tail_fit_positions: int = 4096
    verify: bool = True
    verify_dataset: bool = True

    @classmethod
    def from_config(cls, config: Any) -> CacheSettings:
        raw = dict(getattr(config, "cache", {}) or {})
        names = [f.name for f in dataclasses.fields(cls)]
        for key in raw:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" Did you mean 'cache.{close[0]}'?" if close else ""
                raise ConfigError(f"unknown config key 'cache.{key}'.{hint} The cache settings "
                                  f"are: {', '.join('cache.' + n for n in names)}.")  # fmt: skip
        s = cls(**raw)
        if not s.dir:
            s.dir = str(Path(config.output_dir) / "target_cache")
        if isinstance(s.k, str) and s.k.upper() != "V":
            try:
                s.k = int(s.k)
            except ValueError:
                raise ConfigError(f"config field 'cache.k' = {s.k!r} is not allowed: expected an "
                                  "integer >= 1, or V for the whole vocabulary.") from None  # fmt: skip
        if isinstance(s.k, int) and s.k < 0:
            raise ConfigError(f"config field 'cache.k' = {s.k} is not allowed: expected an integer "
                              ">= 1, or V for the whole vocabulary.")  # fmt: skip
        if s.value_dtype not in (*VALUE_DTYPES, *QUANTISED_VALUES):
            raise ConfigError(f"config field 'cache.value_dtype' = {s.value_dtype!r} is not allowed: "
                              f"expected one of {', '.join([*VALUE_DTYPES, *QUANTISED_VALUES])}.")  # fmt: skip
        if s.index_dtype not in ("auto", *INDEX_DTYPES):
            raise ConfigError(f"config field 'cache.index_dtype' = {s.index_dtype!r} is not allowed: "
                              "expected auto, uint16, uint24, int32 or packed.")  # fmt: skip
        if s.source not in ("local", "servers"):
            raise ConfigError(f"config field 'cache.source' = {s.source!r} is not allowed: expected "
                              "local or servers (where `deltakd cache build` gets the frozen "
                              "models' outputs).")  # fmt: skip
        if int(s.rows_per_shard) < 1 or (s.batch_size is not None and int(s.batch_size) < 1):
            raise ConfigError("config fields 'cache.rows_per_shard' and 'cache.batch_size' must be "
                              "integers >= 1.")  # fmt: skip
        if not isinstance(s.tail_rank, int) or isinstance(s.tail_rank, bool) or s.tail_rank < 0:
            raise ConfigError(f"config field 'cache.tail_rank' = {s.tail_rank!r} is not allowed: "
                              "expected an integer >= 0 (0 = no tail model, the tail is one "
                              "bucket; e.g. 64).")  # fmt: skip
        if int(s.tail_fit_positions) < max(1, s.tail_rank):
            raise ConfigError(f"config field 'cache.tail_fit_positions' = {s.tail_fit_positions} "
                              f"is not allowed: the tail model of rank {s.tail_rank} needs at "
                              "least that many positions to fit on (e.g. 4096).")  # fmt: skip
        s.tail_fit_positions = int(s.tail_fit_positions)
        s.batch_size = int(s.batch_size or config.per_device_batch_size)
        s.rows_per_shard = int(s.rows_per_shard)
        return s

    def resolve_k(self, vocab_size: int) -> int:
        """The integer k for a vocabulary of `vocab_size` tokens (`V`/0 means all of it)."""
        k = self.k
        if isinstance(k, str) or k == 0 or k > vocab_size:
            return vocab_size
        return int(k)


# --- fingerprints ------------------------------------------------------------------------------


def row_key(ids: Sequence[int] | Any) -> bytes:
    """blake2b-128 of a row's token ids as little-endian int32 (list, numpy or torch)."""
    import numpy as np

    if hasattr(ids, "cpu"):
        ids = ids.cpu().numpy()
    arr = np.asarray(ids, dtype="<i4")
    return hashlib.blake2b(arr.tobytes(), digest_size=ROW_KEY_BYTES).digest()


def dataset_hash(keys: Iterable[bytes]) -> str:
    """sha256 over the ordered row keys: changes with any row, token or order change."""
    h = hashlib.sha256()
    for key in keys:
        h.update(key)
    return h.hexdigest()


_SAMPLE_BLOCKS = 16
_BLOCK = 1 << 16


def _file_digest(h: Any, path: Path) -> None:
    """Feed a weight file into `h`: whole when small, else its size and 16 evenly spaced 64 KiB
    blocks (the first holds the safetensors header). Finetuning changes every tensor, so sampled
    blocks tell checkpoints apart without reading 15 GB at every run start."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as fh:
        if size <= _SAMPLE_BLOCKS * _BLOCK:
            h.update(fh.read())
            return
        step = (size - _BLOCK) // (_SAMPLE_BLOCKS - 1)
        for i in range(_SAMPLE_BLOCKS):
            fh.seek(i * step)
            h.update(fh.read(_BLOCK))


def model_fingerprint(path: str) -> str:
    """A hash of a model directory's config.json and weight files (see `_file_digest`).

    Hub names that are not local directories are identified by name only (`hub:<name>`).
    """
    from deltakd.data.vocab import resolve_model_path

    resolved = Path(resolve_model_path(path))
    if not resolved.is_dir():
        return f"hub:{path}"
    h = hashlib.sha256()
    cfg = resolved / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    weights = sorted(p for p in resolved.iterdir()
                     if p.is_file() and (p.suffix in (".safetensors", ".bin", ".pt")
                                         or p.name.endswith(".index.json")))  # fmt: skip
    for p in weights:
        _file_digest(h, p)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# --- manifest ----------------------------------------------------------------------------------


@dataclass
class ShardInfo:
    file: str
    rows: tuple[int, int]  # [start, end) in the deduplicated row order
    positions: int
    bytes: int = 0
    sha256: str = ""


@dataclass
class CacheManifest:
    """Everything that decides which targets a cache holds, plus its shard list.

    `target`: method, variant, alpha, temperature, k, formula. `models`: role -> {path,
    fingerprint}. `tokenizer`: {path, fingerprint, vocab_size}. `dataset`: {spec, split, limit,
    max_length, truncation, rows, unique_rows, response_tokens, hash}. `encoding`: index and
    value dtypes, bytes per position. `references`: the source (local / servers) and the dtype
    the frozen models ran in (recorded, not compared with a run: a cache built in fp32 serves a
    bf16 run).
    """

    target: dict[str, Any]
    models: dict[str, dict[str, str]]
    tokenizer: dict[str, Any]
    dataset: dict[str, Any]
    encoding: dict[str, Any]
    rows_per_shard: int
    #: how the frozen models' outputs were produced: {source, dtype, servers}
    references: dict[str, Any] = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    #: the tail model's file {file, bytes, sha256}; empty without one
    tail_model: dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    created_by: str = ""

    def __post_init__(self) -> None:
        enc = self.encoding
        if is_packed(enc.get("index_dtype", ""), enc.get("value_dtype", "")):
            self.version = max(self.version, PACKED_FORMAT_VERSION)

    def settings_hash(self) -> str:
        """Hash of everything except the shard list: shards built under another hash are stale."""
        d = {k: getattr(self, k) for k in ("target", "models", "tokenizer", "dataset", "encoding",
                                           "rows_per_shard", "references", "format", "version")}  # fmt: skip
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["settings_hash"] = self.settings_hash()
        return json.dumps(d, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CacheManifest:
        d = dict(d)
        d.pop("settings_hash", None)
        shards = [ShardInfo(s["file"], tuple(s["rows"]), int(s["positions"]), int(s.get("bytes", 0)),
                            s.get("sha256", "")) for s in d.pop("shards", [])]  # fmt: skip
        return cls(**d, shards=shards)

    @property
    def tail_rank(self) -> int:
        return int(self.encoding.get("tail_rank", 0))

    @property
    def total_bytes(self) -> int:
        """Shard bytes. The tail model's file (a fixed r × V, whatever the dataset size) is
        not included: `tail_model["bytes"]`."""
        return sum(s.bytes for s in self.shards)

    @property
    def response_tokens(self) -> int:
        return sum(s.positions for s in self.shards)

    def bytes_per_token(self) -> float:
        """Shard bytes (headers and row tables included) per stored response position."""
        return self.total_bytes / max(self.response_tokens, 1)


def read_manifest(cache_dir: str | Path) -> CacheManifest:
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CacheError(f"no offline cache at {cache_dir}: {MANIFEST_NAME} is missing. Build it with "
                         "`deltakd cache build CONFIG` (same config as the run), or set cache.dir "
                         "to the directory of a built cache.")  # fmt: skip
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT_NAME:
            raise ValueError(f"format is {data.get('format')!r}, not {FORMAT_NAME!r}")
        if int(data.get("version", -1)) not in READABLE_VERSIONS:
            raise ValueError(
                f"format version {data.get('version')} is not one this deltakd "
                f"reads ({', '.join(map(str, READABLE_VERSIONS))})"
            )
        manifest = CacheManifest.from_dict(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise CacheError(f"{path} is not a readable deltakd cache manifest ({exc}): rebuild the "
                         "cache with `deltakd cache build CONFIG`.") from exc  # fmt: skip
    return manifest


def encoding_fields(k: int, index_dtype: str, value_dtype: str, tail_rank: int,
                    vocab_size: int) -> dict[str, Any]:  # fmt: skip
    """The manifest's `encoding` entries that describe how a position is stored (the same
    entries as before version 2 for unpacked encodings, so their caches keep their hash)."""
    packed = is_packed(index_dtype, value_dtype)
    return {
        "index_dtype": index_dtype,
        "value_dtype": value_dtype,
        "tail_dtype": "fp16" if packed else "fp32",
        "position_dtype": "spans" if packed else "int32",
        "bytes_per_position": bytes_per_position(
            k, index_dtype, value_dtype, tail_rank, vocab_size
        ),
    }


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory and one rename."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_manifest(cache_dir: str | Path, manifest: CacheManifest) -> None:
    write_atomic(Path(cache_dir) / MANIFEST_NAME, manifest.to_json().encode("utf-8"))
