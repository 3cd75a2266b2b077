"""`build_cache(config)`: run the frozen models over the training set once, store sparse z*.

The dataset is loaded and encoded exactly as `deltakd train` does (same spec, split, limit,
method `prepare_rows`, chat template, max_length, truncation), rows are deduplicated by the
hash of their token ids and cut into shards of `cache.rows_per_shard` rows. Each shard is
written atomically; a shard file already present with this build's settings hash is kept, so
an interrupted build resumes where it stopped. `manifest.json` is written last.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltakd.errors import CacheError, ConfigError, NonFiniteError
from deltakd.loading import choose_device, reference_dtype
from deltakd.references.cache.format import (
    FORMAT_NAME,
    SHARD_PATTERN,
    TAIL_MODEL_NAME,
    CacheManifest,
    CacheSettings,
    ShardInfo,
    dataset_hash,
    encoding_fields,
    file_sha256,
    model_fingerprint,
    read_manifest,
    resolve_index_dtype,
    row_key,
    write_manifest,
)
from deltakd.references.cache.writer import CachedRow, encode_rows, write_shard
from deltakd.targets import TARGET_BUILDERS, Target, target_of

logger = logging.getLogger("deltakd.cache")

#: Positions whose target logits exist at once while building when the config sets no
#: `chunk_size` (the value does not change what is stored: every operation is per position).
DEFAULT_CHUNK_POSITIONS = 1024


# --- what the run needs ------------------------------------------------------------------------


@dataclass
class EncodedDataset:
    """The training rows as the trainer sees them: token ids, assistant masks, row indices."""

    ids: list[list[int]]
    masks: list[list[bool]]
    row_indices: list[int]
    keys: list[bytes]
    stats: Any = None

    @property
    def hash(self) -> str:
        return dataset_hash(self.keys)

    def unique(self) -> list[int]:
        """Positions (into this dataset) of the first occurrence of each distinct row."""
        seen: set[bytes] = set()
        out = []
        for i, key in enumerate(self.keys):
            if key not in seen:
                seen.add(key)
                out.append(i)
        return out


def encode_dataset(config: Any, tokenizer: Any) -> EncodedDataset:
    """Load and encode the config's training set the way `deltakd.train.api.train` does.

    Cacheable targets belong to methods that train on the dataset's rows as they are (a
    method that rewrites them, as SeqKD does, has no fixed target), so no `prepare_rows` runs.
    """
    from deltakd.data.specs import load_rows
    from deltakd.data.tokenize import encode_rows as encode_chat_rows

    rows = load_rows(config.dataset, config.train_split, limit=config.limit)
    encoded, kept, stats = encode_chat_rows(tokenizer, rows, max_length=config.max_length,
                                            truncation=config.truncation)  # fmt: skip
    ids = [e.input_ids for e in encoded]
    return EncodedDataset(ids=ids, masks=[e.assistant_mask for e in encoded], row_indices=list(kept),
                          keys=[row_key(x) for x in ids], stats=stats)  # fmt: skip


def cacheable_target(config: Any) -> Target:
    """The config's target, refused (ConfigError naming the cause) when it is not a fixed
    function of the frozen models and the dataset, or uses another divergence than fkl."""
    target = target_of(config)
    if target is None:
        raise ConfigError(f"method {config.method!r} cannot train from an offline cache: its "
                          f"target is not a fixed function of the frozen models. The cache "
                          f"serves {', '.join(TARGET_BUILDERS)}; use references: local or "
                          "servers.")  # fmt: skip
    target.check_cacheable(config)
    if getattr(config, "on_policy_ratio", 0.0) > 0:
        raise ConfigError(f"config field 'on_policy_ratio' = {config.on_policy_ratio} cannot use "
                          "an offline cache: on-policy samples are new text the cache has never "
                          "seen. Set on_policy_ratio=0 or use references: local / servers.")  # fmt: skip
    return target


def check_cacheable(config: Any) -> None:
    """Refuse methods and settings whose target is not a fixed function of the frozen models."""
    cacheable_target(config)


def reference_roles(config: Any) -> tuple[str, ...]:
    """Frozen roles the config's target needs."""
    return cacheable_target(config).roles


def expected_manifest(config: Any, settings: CacheSettings, tokenizer: Any,
                      data: EncodedDataset | None, roles: Sequence[str]) -> CacheManifest:  # fmt: skip
    """The manifest (without shards) a cache for this config must have.

    `data=None` leaves the dataset hash and counts empty (a run that skips that check).
    """
    from deltakd.data.vocab import tokenizer_fingerprint

    v = len(tokenizer)
    k = settings.resolve_k(v)
    index_dtype = resolve_index_dtype(settings.index_dtype, v)
    rank = int(settings.tail_rank)
    if rank and k >= v:
        raise ConfigError(f"config field 'cache.tail_rank' = {rank} needs a tail, but cache.k = "
                          f"{settings.k} keeps the whole {v}-token vocabulary: set "
                          "cache.tail_rank=0, or a k below V.")  # fmt: skip
    if rank > v:
        raise ConfigError(f"config field 'cache.tail_rank' = {rank} is larger than the vocabulary "
                          f"({v} tokens): use a rank below V (e.g. 64).")  # fmt: skip
    models = {}
    for role in roles:
        path = getattr(config, role, None)
        if not path:
            raise ConfigError(f"config field {role!r} is empty but method {config.method!r} needs "
                              f"the {role} model to build (and to check) the cache: set "
                              f"{role}=PATH.")  # fmt: skip
        models[role] = {"path": str(path), "fingerprint": model_fingerprint(str(path))}
    dataset: dict[str, Any] = {
        "spec": config.dataset, "split": config.train_split, "limit": config.limit,
        "max_length": config.max_length, "truncation": config.truncation,
        "rows": None, "unique_rows": None, "response_tokens": None, "hash": None,
    }  # fmt: skip
    if data is not None:
        uniq = data.unique()
        dataset.update(rows=len(data.keys), unique_rows=len(uniq), hash=data.hash,
                       response_tokens=sum(_response_count(data.masks[i]) for i in uniq))  # fmt: skip
    from deltakd import __version__

    return CacheManifest(
        target=cacheable_target(config).describe(k, config.temperature),
        models=models,
        tokenizer={
            "path": str(config.tokenizer_path),
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "vocab_size": v,
        },
        dataset=dataset,
        encoding={
            **encoding_fields(k, index_dtype, settings.value_dtype, rank, v),
            # Only with a tail model, so caches built before it existed keep their hash.
            **(
                {"tail_rank": rank, "tail_fit_positions": settings.tail_fit_positions}
                if rank
                else {}
            ),
        },
        rows_per_shard=settings.rows_per_shard,
        references={
            "source": settings.source,
            "dtype": str(reference_dtype(config)).removeprefix("torch."),
            "servers": dict(config.servers) if settings.source == "servers" else None,
        },
        created_by=f"deltakd {__version__}",
    )


def _response_count(mask: Sequence[bool]) -> int:
    return sum(bool(m) for m in mask[1:])


# --- computing targets -------------------------------------------------------------------------


def target_logits(config: Any, logits: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The target logits `[B, T-1, V]` of the config's method from the roles' logits."""
    return cacheable_target(config).logits(logits, temperature=config.temperature)


# --- building on every rank --------------------------------------------------------------------


def build_rank() -> tuple[int, int]:
    """(rank, world size) of this build process: RANK / WORLD_SIZE as torchrun and `accelerate
    launch` set them; (0, 1) when run alone."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise CacheError(f"RANK={rank} is not within WORLD_SIZE={world}: launch the build with "
                         "torchrun or accelerate launch, or unset both.")  # fmt: skip
    return rank, world


def rank_shards(n_shards: int, rank: int, world: int) -> list[int]:
    """The shards rank `rank` of `world` builds: every world-th one from its rank on. Shards hold
    `rows_per_shard` rows each, so the ranks get equal work up to one shard."""
    return list(range(rank, n_shards, world))


def _wait_for(ready: Callable[[], Any], what: str, poll: float = 1.0) -> Any:
    """Poll `ready()` until it returns something truthy; say once what rank 0 waits for."""
    said = False
    while not (value := ready()):
        if not said:
            logger.info("waiting for %s (built by other ranks)", what)
            said = True
        time.sleep(poll)
    return value


# --- the build ---------------------------------------------------------------------------------


@dataclass
class BuildResult:
    cache_dir: Path
    manifest: CacheManifest
    built_shards: int
    kept_shards: int
    seconds: float


def _metadata(path: Path) -> dict[str, str] | None:
    """The safetensors metadata of `path`, or None when it is missing or unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, ValueError):
        return None


def _shard_is_done(path: Path, settings_hash: str, index: int) -> bool:
    """A shard file written by a build with the same settings (atomic writes: present = whole)."""
    meta = _metadata(path) or {}
    return (meta.get("format") == FORMAT_NAME and meta.get("settings_hash") == settings_hash
            and meta.get("shard") == str(index))  # fmt: skip


def build_cache(config: Any, *, references: Any = None, progress: bool | None = None,
                overwrite: bool = False) -> BuildResult:  # fmt: skip
    """Build (or finish building) the offline cache of `config` in `cache.dir`.

    Args:
        config: a `TrainConfig` (the same one `deltakd train` reads).
        references: a ReferenceSource to use instead of building `cache.source` from the config.
        progress: show a tqdm bar (default: the config's `progress`).
        overwrite: replace a cache in `cache.dir` that was built for other settings.
    """
    from tqdm.auto import tqdm

    from deltakd.data.tokenize import ChatCollator
    from deltakd.data.vocab import check_vocabulary, load_tokenizer

    start = time.perf_counter()
    check_cacheable(config)
    settings = CacheSettings.from_config(config)
    cache_dir = Path(settings.dir)
    tokenizer = load_tokenizer(config.tokenizer_path, trust_remote_code=config.trust_remote_code)
    roles = reference_roles(config)
    vocab = check_vocabulary(tokenizer, {r: getattr(config, r) for r in roles if getattr(config, r)},
                             trust_remote_code=config.trust_remote_code)  # fmt: skip
    data = encode_dataset(config, tokenizer)
    manifest = expected_manifest(config, settings, tokenizer, data, roles)
    h = manifest.settings_hash()
    k = int(manifest.target["k"])
    rank, world = build_rank()
    mine = set(rank_shards(max(1, math.ceil(len(data.unique()) / settings.rows_per_shard)), rank,
                           world))  # fmt: skip

    cache_dir.mkdir(parents=True, exist_ok=True)
    old_path = cache_dir / "manifest.json"
    if old_path.is_file():
        try:
            old = read_manifest(cache_dir)
            same = old.settings_hash() == h
        except CacheError:
            old, same = None, False
        if not same:
            if not overwrite:
                field, was, now = (
                    _first_difference(old, manifest) if old else ("manifest", "unreadable", "")
                )
                raise CacheError(f"{cache_dir} already holds a cache for other settings ({field}: "
                                 f"{was!r} there, {now!r} in this config). Use another cache.dir, "
                                 "or pass --overwrite to replace it.")  # fmt: skip
            if rank == 0:
                old_path.unlink(missing_ok=True)
        # Same settings: leave it until the new one replaces it (shards are reused below).

    uniq = data.unique()
    rps = settings.rows_per_shard
    n_shards = max(1, math.ceil(len(uniq) / rps))
    show = config.progress if progress is None else progress
    collate = ChatCollator(pad_token_id=tokenizer.pad_token_id)
    source = references
    own_source = False
    built = kept = next_key = 0
    bar = None
    tail_model: tuple[torch.Tensor, torch.Tensor] | None = None
    try:
        if manifest.tail_rank:
            tail_path = cache_dir / TAIL_MODEL_NAME
            tail_model = _read_tail_model(tail_path, h)
            if tail_model is None and rank > 0:  # rank 0 fits it once for everyone
                tail_model = _wait_for(lambda: _read_tail_model(tail_path, h), "the tail model")
            if tail_model is None:
                if source is None:
                    source = _build_source(config, settings, roles)
                    own_source = True
                tail_model = _fit_tail_model(config, settings, data, uniq, source, vocab.vocab_size,
                                             collate, manifest.tail_rank, show)  # fmt: skip
                next_key = _FIT_KEYS
                _write_tail_model(tail_path, tail_model, h)
        # Moved once to where the targets are made, so each row's projection stays there.
        basis, offset = (
            (t.to(choose_device(config.device)) for t in tail_model) if tail_model else (None, None)
        )
        bar = tqdm(total=len(uniq), unit="row", desc=f"cache {cache_dir.name}", disable=not show)
        built_rows, build_start = 0, time.perf_counter()
        for s in range(n_shards):
            lo, hi = s * rps, min((s + 1) * rps, len(uniq))
            path = cache_dir / SHARD_PATTERN.format(s)
            members = uniq[lo:hi]
            n_pos = sum(_response_count(data.masks[i]) for i in members)
            if s not in mine:
                if rank == 0:
                    _wait_for(lambda: path.is_file() and _shard_is_done(path, h, s), path.name)  # noqa: B023
                    manifest.shards.append(ShardInfo(path.name, (lo, hi), n_pos))
                continue
            if path.is_file() and _shard_is_done(path, h, s):
                manifest.shards.append(ShardInfo(path.name, (lo, hi), n_pos))
                kept += 1
                bar.update(hi - lo)
                continue
            if source is None:
                source = _build_source(config, settings, roles)
                own_source = True
            rows: dict[int, CachedRow] = {}
            # Longest rows first inside the shard: less padding, and the batching is a fixed
            # function of the shard's rows, so a resumed build writes the same bytes.
            order = sorted(members, key=lambda i: (-len(data.ids[i]), i))
            batches = [
                order[j : j + settings.batch_size]
                for j in range(0, len(order), settings.batch_size)
            ]
            collated = [_collate_rows(collate, data, b) for b in batches]
            # Keys unique over the whole build: a server client may remember them.
            base = next_key
            next_key += len(collated)
            if collated:
                source.prefetch(base, collated[0])
            for j, (members_b, batch) in enumerate(zip(batches, collated)):
                if j + 1 < len(collated):
                    source.prefetch(base + j + 1, collated[j + 1])
                for b, pos, sparse in _batch_sparse(config, source, vocab.vocab_size, base + j,
                                                    batch, k, basis, offset):  # fmt: skip
                    i = members_b[b]
                    if bool(sparse.logprobs.isnan().any() or sparse.tail_mass.isnan().any()):
                        raise NonFiniteError(
                            f"the target of dataset row {data.row_indices[i]} contains NaN (the "
                            f"reference models' logits are not finite, dtype "
                            f"{manifest.references['dtype']}); nothing was stored for it. Build "
                            "with reference_dtype=fp32, or remove the row."
                        )
                    coeffs = None if sparse.tail_coeffs is None else sparse.tail_coeffs.cpu()
                    rows[i] = CachedRow(data.keys[i], data.row_indices[i], pos, sparse.indices.cpu(),
                                        sparse.logprobs.cpu(), sparse.tail_mass.cpu(), coeffs)  # fmt: skip
                bar.update(len(members_b))
            tensors = encode_rows([rows[i] for i in members], k, manifest.encoding["index_dtype"],
                                  manifest.encoding["value_dtype"], manifest.tail_rank)  # fmt: skip
            meta = {"format": FORMAT_NAME, "settings_hash": h, "shard": str(s),
                    "rows": f"{lo}:{hi}"}  # fmt: skip
            write_shard(path, tensors, meta)
            manifest.shards.append(ShardInfo(path.name, (lo, hi), n_pos))
            built += 1
            built_rows += hi - lo
    finally:
        if bar is not None:
            bar.close()
        if own_source and source is not None:
            source.close()

    if built_rows:
        took = time.perf_counter() - build_start
        logger.info("cache build rank %d of %d: %d rows in %.1fs, %.1f rows/s", rank, world,
                    built_rows, took, built_rows / max(took, 1e-9))  # fmt: skip
    if rank > 0:  # rank 0 writes the manifest once every rank's shards are there
        return BuildResult(cache_dir, manifest, built, kept, time.perf_counter() - start)
    for info in manifest.shards:
        p = cache_dir / info.file
        info.bytes = p.stat().st_size
        info.sha256 = file_sha256(p)
    if manifest.tail_rank:
        p = cache_dir / TAIL_MODEL_NAME
        manifest.tail_model = {"file": p.name, "bytes": p.stat().st_size, "sha256": file_sha256(p)}
    manifest.complete = True
    write_manifest(cache_dir, manifest)
    _remove_strays(cache_dir, n_shards)
    seconds = time.perf_counter() - start
    logger.info("cache %s: %d shards built, %d kept, %.1f bytes/token, %.1fs, %.1f rows/s over "
                "%d rank(s)", cache_dir, built, kept, manifest.bytes_per_token(), seconds,
                len(uniq) / max(seconds, 1e-9), world)  # fmt: skip
    return BuildResult(cache_dir, manifest, built, kept, seconds)


def _collate_rows(collate: Any, data: EncodedDataset, members: Sequence[int]) -> dict[str, Any]:
    """The dataset rows `members` collated as the trainer collates them."""
    return collate([{"input_ids": data.ids[i], "assistant_mask": data.masks[i],
                     "row_index": data.row_indices[i]} for i in members])  # fmt: skip


def _row_target_chunks(config: Any, source: Any, vocab_size: int, key: int,
                       batch: Mapping[str, torch.Tensor]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:  # fmt: skip
    """The method's target logits at the counted positions of each row of a collated batch,
    `chunk_size` positions at a time: yields (row b, positions (c,), target logits (c, V)).

    Positions index the trainer's next-token positions `0 .. T-2` (the response mask
    `assistant_mask[:, 1:] & attention_mask[:, 1:]`). Only a chunk of logits per role exists at
    once, computed from the sources' hidden states and each role's output layer where they send
    them (never `(B, T, V)` float32 logits of every role: 2 GiB per 1k-token row at V = 152k).
    """
    from deltakd.losses.heads import as_logit_head

    ref = source.fetch(key, batch)
    device = choose_device(config.device)
    heads = {r: as_logit_head(h).to(device) for r, h in source.lm_heads().items()}
    mask = batch["assistant_mask"][:, 1:].bool() & batch["attention_mask"][:, 1:].bool()
    chunk = int(config.chunk_size or DEFAULT_CHUNK_POSITIONS)
    target = cacheable_target(config)

    for b in range(mask.shape[0]):
        pos = mask[b].nonzero().flatten()  # (n,)
        for lo in range(0, max(len(pos), 1), chunk):
            part = pos[lo : lo + chunk]  # (c,)

            def logits(role: str, b: int = b, part: torch.Tensor = part) -> torch.Tensor:  # (c, V)
                if role in ref.logits:
                    return ref.logits[role][b, part.to(ref.logits[role].device), :vocab_size].to(
                        device
                    )
                if role in ref.hidden:
                    hidden = ref.hidden[role][b, part.to(ref.hidden[role].device)]  # (c, H)
                    return heads[role].apply(hidden.to(device), vocab=vocab_size)
                raise CacheError(f"the reference source returned no output for role {role!r}; "
                                 "configure that role for the source.")  # fmt: skip

            yield b, part, target.logits(logits)


def _batch_sparse(config: Any, source: Any, vocab_size: int, key: int,
                  batch: Mapping[str, torch.Tensor], k: int, basis: torch.Tensor | None,
                  offset: torch.Tensor | None) -> Iterator[tuple[int, torch.Tensor, Any]]:  # fmt: skip
    """(row b, positions (n,), its `SparseTarget` (n, k)) for each row of a collated batch,
    made chunk by chunk (`_row_target_chunks`) and joined per row."""
    from deltakd.losses import SparseTarget

    tau = float(config.temperature)
    parts: list[Any] = []
    positions: list[torch.Tensor] = []
    row = None
    for b, pos, z in _row_target_chunks(config, source, vocab_size, key, batch):
        if row is not None and b != row:
            yield row, torch.cat(positions), _join_sparse(parts)
            parts, positions = [], []
        row = b
        positions.append(pos)
        parts.append(SparseTarget.from_logits(z, k, tau, tail_basis=basis, tail_offset=offset))
    if row is not None:
        yield row, torch.cat(positions), _join_sparse(parts)


def _join_sparse(parts: Sequence[Any]) -> Any:
    """One `SparseTarget` of the positions of `parts` (same k, τ and tail model), in order."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    coeffs = None if first.tail_coeffs is None else torch.cat([p.tail_coeffs for p in parts])
    return type(first)(torch.cat([p.indices for p in parts]), torch.cat([p.logprobs for p in parts]),
                       torch.cat([p.tail_mass for p in parts]), first.temperature, coeffs,
                       first.tail_basis, first.tail_offset)  # fmt: skip


#: reference keys used by the tail-model fit; the shards' keys start after them
_FIT_KEYS = 1 << 20


def _fit_tail_model(config: Any, settings: CacheSettings, data: EncodedDataset, uniq: list[int],
                    source: Any, vocab_size: int, collate: Any, rank: int,
                    show: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Fit the tail model on the target log-probabilities of the first rows (dedup order, so a
    resumed or repeated build fits on the same positions): (basis (r, V), offset (V,))."""
    from tqdm.auto import tqdm

    from deltakd.losses import fit_tail_model

    want = settings.tail_fit_positions
    parts: list[torch.Tensor] = []
    have = 0
    bar = tqdm(total=want, unit="pos", desc="tail model fit", disable=not show)
    for j in range(0, len(uniq), settings.batch_size):
        if have >= want:
            break
        batch = _collate_rows(collate, data, uniq[j : j + settings.batch_size])
        for _, _, z in _row_target_chunks(config, source, vocab_size, j, batch):
            if have >= want:
                break
            take = z[: want - have]  # (n, V), fitted where the models ran
            parts.append(torch.log_softmax(take.float() / config.temperature, dim=-1))
            have += take.shape[0]
            bar.update(take.shape[0])
    bar.close()
    if have < rank:
        raise ConfigError(f"config field 'cache.tail_rank' = {rank} needs at least {rank} response "
                          f"positions to fit on, but the dataset has {have}: lower the rank or "
                          "use more rows.")  # fmt: skip
    logger.info("cache: fitting a rank-%d tail model on %d positions", rank, have)
    basis, offset = fit_tail_model(torch.cat(parts), rank)
    return basis.cpu(), offset.cpu()


def _read_tail_model(path: Path, settings_hash: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The tail model a previous run of this build wrote, or None (absent, other settings)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if (_metadata(path) or {}).get("settings_hash") != settings_hash:
        return None
    try:
        tensors = load_file(str(path))
        return tensors["basis"], tensors["offset"]
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError):
        return None  # damaged: fitted again


def _write_tail_model(path: Path, model: tuple[torch.Tensor, torch.Tensor], h: str) -> None:
    write_shard(path, {"basis": model[0].contiguous(), "offset": model[1].contiguous()},
                {"format": FORMAT_NAME, "settings_hash": h, "kind": "tail_model"})  # fmt: skip


def _build_source(config: Any, settings: CacheSettings, roles: Sequence[str]) -> Any:
    from deltakd.references.factory import build_reference_source

    # `references: cache` in the training config: build from `cache.source` instead; with
    # hidden states (as fused_loss asks) so targets are made a chunk of positions at a time.
    cfg = config.replace(references=settings.source, fused_loss=True)
    return build_reference_source(cfg, tuple(roles), choose_device(config.device),
                                  reference_dtype(config))  # fmt: skip


def _first_difference(old: CacheManifest, new: CacheManifest) -> tuple[str, Any, Any]:
    for section in ("target", "tokenizer", "dataset", "models", "encoding", "references"):
        a, b = getattr(old, section), getattr(new, section)
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return f"{section}.{key}", a.get(key), b.get(key)
    return "rows_per_shard", old.rows_per_shard, new.rows_per_shard


def _remove_strays(cache_dir: Path, n_shards: int) -> None:
    """Delete temp files and shards past the end (left by an older, larger build)."""
    pattern = re.compile(r"shard-(\d{5})\.safetensors")
    for p in cache_dir.iterdir():
        m = pattern.fullmatch(p.name)
        if (m and int(m.group(1)) >= n_shards) or p.name.startswith(".tmp-"):
            p.unlink(missing_ok=True)
