"""Reading a cache: open the shards, index rows by key, decode one row's targets.

Shards are opened with `safetensors.safe_open` (memory-mapped), and a row's slice is read on
demand, so a cache larger than RAM works and opening one costs only the row tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from deltakd.errors import CacheError
from deltakd.references.cache.format import (
    QUANTISED_VALUES,
    TAIL_MODEL_NAME,
    CacheManifest,
    file_sha256,
    is_packed,
    read_manifest,
)
from deltakd.references.cache.writer import decode_indices, decode_packed_rows

_REQUIRED = ("row_keys", "row_index", "row_offsets", "positions", "indices", "logprobs",
             "tail_mass")  # fmt: skip
#: a format-version-2 shard's tensors (`packing`); `ef_universe` comes with packed ids,
#: `tail_coeff_scale` (per shard) with int8 tail-model coefficients (quantised values and a tail
#: model)
_REQUIRED_PACKED = ("row_keys", "row_index", "row_offsets", "span_start", "span_length",
                    "row_spans", "indices", "logprobs", "tail_mass")  # fmt: skip


def _required(manifest: CacheManifest) -> tuple[str, ...]:
    enc = manifest.encoding
    if not is_packed(enc["index_dtype"], enc["value_dtype"]):
        names = _REQUIRED
    else:
        names = _REQUIRED_PACKED
        names += ("ef_universe",) if enc["index_dtype"] == "packed" else ()
        quantised = enc["value_dtype"] in QUANTISED_VALUES
        names += ("tail_coeff_scale",) if manifest.tail_rank and quantised else ()
    return (*names, "tail_coeffs") if manifest.tail_rank else names


@dataclass
class RowTargets:
    """One row's cached targets: positions (n,) long, indices (n, k) long, logprobs (n, k)
    float32, tail_mass (n,) float32, and with a tail model tail_coeffs (n, r) float32."""

    positions: torch.Tensor
    indices: torch.Tensor
    logprobs: torch.Tensor
    tail_mass: torch.Tensor
    tail_coeffs: torch.Tensor | None = None


def _rebuild_hint() -> str:
    return "Rebuild the cache with `deltakd cache build CONFIG` (completed shards are kept)."


class CacheReader:
    """Random access to the rows of a built cache.

    Args:
        cache_dir: the cache directory (holds manifest.json and the shards).
        verify: check each shard's sha256 against the manifest the first time it is read.
    """

    def __init__(self, cache_dir: str | Path, *, verify: bool = True) -> None:
        self.dir = Path(cache_dir)
        self.manifest: CacheManifest = read_manifest(self.dir)
        if not self.manifest.complete:
            raise CacheError(f"the cache at {self.dir} is incomplete (its build was interrupted): "
                             f"{_rebuild_hint()}")  # fmt: skip
        self.verify = verify
        self.k = int(self.manifest.target["k"])
        self._handles: list[Any] = []
        self._tensors: dict[int, dict[str, torch.Tensor]] = {}
        self._offsets: list[torch.Tensor] = []
        self._verified: set[int] = set()
        self.index: dict[bytes, tuple[int, int]] = {}  # row key -> (shard, row in shard)
        self.tail_rank = self.manifest.tail_rank
        #: (basis (r, V), offset (V,)) float32 with a tail model, else None
        self.tail_model = self._load_tail_model() if self.tail_rank else None
        required = _required(self.manifest)
        enc = self.manifest.encoding
        self.packed = is_packed(enc["index_dtype"], enc["value_dtype"])
        self._spans: list[torch.Tensor] = []
        for s, info in enumerate(self.manifest.shards):
            path = self.dir / info.file
            if not path.is_file():
                raise CacheError(f"cache shard {info.file} is missing from {self.dir} (the "
                                 f"manifest lists {len(self.manifest.shards)} shards). "
                                 f"{_rebuild_hint()}")  # fmt: skip
            size = path.stat().st_size
            if info.bytes and size != info.bytes:
                raise CacheError(f"cache shard {info.file} in {self.dir} has {size} bytes, the "
                                 f"manifest says {info.bytes}: the file is truncated or was "
                                 f"replaced. {_rebuild_hint()}")  # fmt: skip
            try:
                handle = safe_open(str(path), framework="pt")
                names = set(handle.keys())
                missing = [n for n in required if n not in names]
                if missing:
                    raise ValueError(f"tensors {missing} are missing")
                keys = handle.get_tensor("row_keys")
                offsets = handle.get_tensor("row_offsets")
                if self.packed:
                    self._spans.append(handle.get_tensor("row_spans"))
            except (SafetensorError, ValueError, OSError, RuntimeError) as exc:
                raise CacheError(f"cache shard {info.file} in {self.dir} is corrupt ({exc}). "
                                 f"{_rebuild_hint()}") from exc  # fmt: skip
            self._handles.append(handle)
            self._offsets.append(offsets)
            raw = keys.numpy().tobytes()
            width = keys.shape[1]
            for r in range(keys.shape[0]):
                self.index.setdefault(raw[r * width : (r + 1) * width], (s, r))

    def _load_tail_model(self) -> tuple[torch.Tensor, torch.Tensor]:
        info = self.manifest.tail_model
        path = self.dir / info.get("file", TAIL_MODEL_NAME)
        if not path.is_file():
            raise CacheError(f"the cache at {self.dir} has a rank-{self.tail_rank} tail model but "
                             f"{path.name} is missing. {_rebuild_hint()}")  # fmt: skip
        if self.verify and info.get("sha256") and file_sha256(path) != info["sha256"]:
            raise CacheError(f"the tail model {path.name} in {self.dir} is corrupt: its sha256 "
                             f"differs from the manifest's. {_rebuild_hint()}")  # fmt: skip
        try:
            with safe_open(str(path), framework="pt") as fh:
                basis, offset = fh.get_tensor("basis"), fh.get_tensor("offset")
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CacheError(f"the tail model {path.name} in {self.dir} cannot be read ({exc}). "
                             f"{_rebuild_hint()}") from exc  # fmt: skip
        v = int(self.manifest.tokenizer["vocab_size"])
        if tuple(basis.shape) != (self.tail_rank, v) or tuple(offset.shape) != (v,):
            raise CacheError(f"the tail model {path.name} in {self.dir} holds a basis "
                             f"{tuple(basis.shape)}, not ({self.tail_rank}, {v}) as the manifest "
                             f"says. {_rebuild_hint()}")  # fmt: skip
        return basis.float(), offset.float()

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: bytes) -> bool:
        return key in self.index

    def verify_shard(self, s: int) -> None:
        """Compare shard `s`'s sha256 with the manifest (once per reader)."""
        if s in self._verified:
            return
        info = self.manifest.shards[s]
        digest = file_sha256(self.dir / info.file)
        if info.sha256 and digest != info.sha256:
            raise CacheError(f"cache shard {info.file} in {self.dir} is corrupt: its sha256 is "
                             f"{digest[:16]}…, the manifest says {info.sha256[:16]}…. "
                             f"{_rebuild_hint()}")  # fmt: skip
        self._verified.add(s)

    def verify_all(self) -> None:
        for s in range(len(self.manifest.shards)):
            self.verify_shard(s)

    def row(self, key: bytes) -> RowTargets | None:
        """The cached targets of the row with this key, or None if the cache lacks it."""
        where = self.index.get(key)
        if where is None:
            return None
        s, r = where
        if self.verify:
            self.verify_shard(s)
        a, b = int(self._offsets[s][r]), int(self._offsets[s][r + 1])
        try:
            t = self._shard_tensors(s)
            if self.packed:
                sa, sb = int(self._spans[s][r]), int(self._spans[s][r + 1])
                d = decode_packed_rows(t, a, b, sa, sb, self.k,
                                       self.manifest.encoding["value_dtype"])  # fmt: skip
                return RowTargets(**d)
            out = RowTargets(
                positions=t["positions"][a:b].long(),
                indices=decode_indices(t["indices"][a:b]),
                logprobs=t["logprobs"][a:b].float(),
                tail_mass=t["tail_mass"][a:b].float(),
                tail_coeffs=t["tail_coeffs"][a:b].float() if self.tail_rank else None,
            )
        except (SafetensorError, RuntimeError, OSError, ValueError) as exc:
            info = self.manifest.shards[s]
            raise CacheError(f"cache shard {info.file} in {self.dir} cannot be read ({exc}). "
                             f"{_rebuild_hint()}") from exc  # fmt: skip
        return out

    def _shard_tensors(self, s: int) -> dict[str, torch.Tensor]:
        """Shard `s`'s per-position tensors, opened once. safetensors maps the file into
        memory (nothing is read until a row is touched), and slicing a tensor costs about a
        microsecond where `get_slice(...)[a:b]` costs about ten."""
        tensors = self._tensors.get(s)
        if tensors is None:
            handle = self._handles[s]
            names = tuple(n for n in _required(self.manifest) if n not in
                          ("row_keys", "row_index", "row_offsets", "row_spans"))  # fmt: skip
            tensors = self._tensors[s] = {n: handle.get_tensor(n) for n in names}
        return tensors

    def filler(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Entries for positions the cache does not hold (prompt, padding): a uniform
        distribution over the vocabulary, so every value is finite; the trainer masks them."""
        v = int(self.manifest.tokenizer["vocab_size"])
        idx = torch.arange(self.k, dtype=torch.long)
        lp = torch.full((self.k,), -math.log(v), dtype=torch.float32)
        return idx, lp, max(0.0, 1.0 - self.k / v)

    def close(self) -> None:
        self._tensors.clear()
        self._handles.clear()
        self._offsets.clear()
