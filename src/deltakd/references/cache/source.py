"""`CacheReferences`: the offline cache as a `ReferenceSource` (docs/ARCHITECTURE.md §2, source 3).

`fetch` looks each batch row up by the hash of its token ids and returns one `SparseTarget`
of leading shape [B, T] aligned with `input_ids`: the entry at position t is the target for
token t + 1. Positions the cache does not hold (prompt, padding, the last position) get a
finite uniform filler; the trainer's response mask excludes them from the loss.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from deltakd.errors import CacheError
from deltakd.references.base import ReferenceBatch, ReferenceSource
from deltakd.references.cache.format import CacheManifest, row_key
from deltakd.references.cache.reader import CacheReader

logger = logging.getLogger("deltakd.cache")

_REBUILD = ("Rebuild the cache for this config with `deltakd cache build CONFIG --overwrite`, "
            "or point cache.dir at a cache built for these settings.")  # fmt: skip


def check_manifest(found: CacheManifest, expected: CacheManifest, cache_dir: str | Path) -> None:
    """Raise CacheError naming the first field where the cache differs from the run.

    Dataset fields that `expected` leaves as None (not computed) and models absent from
    `expected` are not compared.
    """
    checks: list[tuple[str, Any, Any]] = []
    for key in ("method", "variant", "alpha", "temperature", "k"):
        checks.append((f"target.{key}", found.target.get(key), expected.target.get(key)))
    # A run asking for a tail model must not silently train with a bucket, and vice versa.
    checks.append(("cache.tail_rank", found.tail_rank, expected.tail_rank))
    checks.append(("tokenizer.fingerprint", found.tokenizer.get("fingerprint"),
                   expected.tokenizer.get("fingerprint")))  # fmt: skip
    checks.append(("tokenizer.vocab_size", found.tokenizer.get("vocab_size"),
                   expected.tokenizer.get("vocab_size")))  # fmt: skip
    for key in ("spec", "split", "limit", "max_length", "truncation", "hash"):
        want = expected.dataset.get(key)
        if key == "hash" and want is None:
            continue
        checks.append((f"dataset.{key}", found.dataset.get(key), want))
    for role, ident in expected.models.items():
        have = found.models.get(role, {}).get("fingerprint")
        checks.append((f"models.{role}", have, ident.get("fingerprint")))
    for name, have, want in checks:
        if have != want:
            if name.startswith("models."):
                role = name.split(".", 1)[1]
                detail = (f"the {role} model differs: the cache was built from "
                          f"{found.models.get(role, {}).get('path')!r} (fingerprint "
                          f"{str(have)[:12]}), this run names {expected.models[role]['path']!r} "
                          f"(fingerprint {str(want)[:12]})")  # fmt: skip
            elif name in ("tokenizer.fingerprint", "dataset.hash"):
                detail = (
                    f"{name} is {str(have)[:16]}… in the cache but {str(want)[:16]}… for this run"
                )
            else:
                detail = f"{name} is {have!r} in the cache but {want!r} in this run's config"
            fix = _REBUILD
            if name == "cache.tail_rank":  # the run's own choice: either side may move
                fix = f"Set cache.tail_rank={have} to train from this cache as built. {_REBUILD}"
            raise CacheError(f"the offline cache at {cache_dir} does not match this run: {detail}. "
                             f"{fix}")  # fmt: skip


class CacheReferences(ReferenceSource):
    """Sparse Delta-KD (or KD) targets read from a built cache; no reference model is loaded.

    Args:
        cache_dir: directory written by `deltakd cache build` (or a `CacheReader`).
        device: where the returned tensors go.
        verify: check each shard's sha256 the first time it is read.
        expected: the manifest the run needs (see `build.expected_manifest`); refused with a
            CacheError naming the field when the cache differs.
    """

    def __init__(self, cache_dir: str | Path | CacheReader, *, device: str | torch.device = "cpu",
                 verify: bool = True, expected: CacheManifest | None = None) -> None:  # fmt: skip
        self.reader = (
            cache_dir
            if isinstance(cache_dir, CacheReader)
            else CacheReader(cache_dir, verify=verify)
        )
        self.manifest = self.reader.manifest
        if expected is not None:
            check_manifest(self.manifest, expected, self.reader.dir)
        self.device = torch.device(device)
        self.roles = tuple(self.manifest.models)
        self.k = self.reader.k
        self.temperature = float(self.manifest.target["temperature"])
        self._fill_idx, self._fill_lp, self._fill_tail = self.reader.filler()
        model = self.reader.tail_model
        self._tail_model = None if model is None else tuple(t.to(self.device) for t in model)
        # No prefetch thread: assembling a batch is a few memory-mapped reads (under a
        # millisecond at the mini world's sizes, a few ms for 16k-token batches), and a worker
        # thread doing them in the background made the student's Python-heavy step slower
        # through the GIL than the work it hid (measured with `deltakd bench cache`).

    def fetch(self, key: int, batch: Mapping[str, torch.Tensor]) -> ReferenceBatch:
        """`ReferenceBatch(target=SparseTarget)` of leading shape [B, T] for `batch`."""
        start = time.perf_counter()
        target = self._assemble(batch)
        return ReferenceBatch(target=target, wait_seconds=time.perf_counter() - start)

    def _assemble(self, batch: Mapping[str, torch.Tensor]) -> Any:
        from deltakd.losses import SparseTarget

        ids = batch["input_ids"].cpu()
        attn = batch["attention_mask"].cpu().bool()
        amask = batch.get("assistant_mask")
        rows = batch.get("row_index")
        b_size, t_len = ids.shape
        k = self.k
        indices = self._fill_idx.expand(b_size, t_len, k).clone()  # (B, T, k)
        logprobs = self._fill_lp.expand(b_size, t_len, k).clone()  # (B, T, k)
        tail = torch.full((b_size, t_len), self._fill_tail, dtype=torch.float32)  # (B, T)
        r = self.reader.tail_rank
        coeffs = torch.zeros(b_size, t_len, r) if r else None  # (B, T, r): the model's mean
        rows_b: list[torch.Tensor] = []
        rows_t: list[torch.Tensor] = []
        parts: list[Any] = []
        lengths = attn.sum(1).tolist()  # (B,)
        firsts = attn.to(torch.int8).argmax(1).tolist()  # where each row starts (left padding)
        resp = None if amask is None else amask[:, 1:].cpu().bool() & attn[:, 1:]  # (B, T-1)
        for b in range(b_size):
            n = lengths[b]
            first = firsts[b] if n else 0
            row_ids = ids[b, first : first + n]
            found = self.reader.row(row_key(row_ids))
            if found is None:
                if self.reader.verify:
                    self.reader.verify_all()  # a damaged row table looks like a missing row
                where = f" (dataset row {int(rows[b])})" if rows is not None else ""
                raise CacheError(
                    f"batch row {b}{where} with {n} tokens is not in the offline cache at "
                    f"{self.reader.dir}: the run's dataset or its tokenization (dataset, split, "
                    "limit, max_length, chat template) differs from the one the cache was built "
                    f"from ({self.manifest.dataset.get('spec')!r}). {_REBUILD}"
                )
            pos = found.positions + first
            if resp is not None:
                want = resp[b].nonzero().flatten()
                if not torch.equal(want, pos):
                    raise CacheError(
                        f"batch row {b}: the cache holds targets at {pos.numel()} response "
                        f"positions but this run's assistant mask has {want.numel()}: the "
                        f"response masks differ from the build's. {_REBUILD}"
                    )
            rows_b.append(torch.full_like(pos, b))
            rows_t.append(pos)
            parts.append(found)
        if parts:  # one scatter per tensor for the whole batch
            where = (torch.cat(rows_b), torch.cat(rows_t))
            indices[where] = torch.cat([f.indices for f in parts])
            logprobs[where] = torch.cat([f.logprobs for f in parts])
            tail[where] = torch.cat([f.tail_mass for f in parts])
            if coeffs is not None:
                coeffs[where] = torch.cat([f.tail_coeffs for f in parts])
        basis, offset = self._tail_model if self._tail_model is not None else (None, None)
        return SparseTarget(indices.to(self.device), logprobs.to(self.device),
                            tail.to(self.device), self.temperature,
                            None if coeffs is None else coeffs.to(self.device), basis, offset)  # fmt: skip

    def close(self) -> None:
        self.reader.close()


def from_config(config: Any, roles: tuple[str, ...], device: torch.device) -> CacheReferences:
    """`references: cache` for `deltakd train`: open `cache.dir` and check it fits the run.

    Compared with the run: method, variant, α, τ, k, the tokenizer's fingerprint, the dataset
    (spec, split, limit, max_length, truncation and, with `cache.verify_dataset`, the hash of
    the encoded rows) and the fingerprint of every reference model the config names.
    """
    from deltakd.loading import load_tokenizer
    from deltakd.references.cache.build import (
        check_cacheable,
        encode_dataset,
        expected_manifest,
    )
    from deltakd.references.cache.format import CacheSettings

    check_cacheable(config)
    settings = CacheSettings.from_config(config)
    reader = CacheReader(settings.dir, verify=settings.verify)
    tokenizer = load_tokenizer(config.tokenizer_path, trust_remote_code=config.trust_remote_code)
    data = encode_dataset(config, tokenizer) if settings.verify_dataset else None
    # Models the run does not name (training without the teachers on disk) are not compared.
    named = tuple(r for r in roles if getattr(config, r, None))
    missing = [r for r in roles if r not in named]
    if missing:
        logger.warning("cache %s: roles %s are not named in the config; their identity is not "
                       "checked", settings.dir, ", ".join(missing))  # fmt: skip
    expected = expected_manifest(config, settings, tokenizer, data, named)
    return CacheReferences(reader, device=device, expected=expected)
