"""`deltakd cache build CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deltakd.references.cache.format import CacheManifest


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache",
        help="precompute sparse targets (offline cache)",
        description="Offline target cache: compute the distillation target once, train from it.",
    )
    actions = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    b = actions.add_parser(
        "build",
        help="run the reference models over the training set and store top-k targets",
        description=(
            "Run the frozen models of a training config over its training set and store, for "
            "every response position, the top-k log-probabilities of the target (z* for "
            "delta_kd) at the run's temperature plus the tail mass, in safetensors shards under "
            "cache.dir (default OUTPUT_DIR/target_cache). Settings: cache.k (64), "
            "cache.value_dtype (fp16), cache.index_dtype (auto), cache.rows_per_shard (1024), "
            "cache.batch_size, cache.source (local|servers). An interrupted build resumes: "
            "finished shards are kept. Then train with `references: cache`."
        ),
    )
    b.add_argument("config", help="YAML config (the one `deltakd train` reads)")
    b.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    b.add_argument("--overwrite", action="store_true",
                   help="replace a cache in cache.dir that was built for other settings")  # fmt: skip
    b.set_defaults(func=_build)
    v = actions.add_parser(
        "verify",
        help="check a built cache: manifest, every shard's presence and sha256",
        description="Read a cache's manifest and check every shard file's size and sha256.",
    )
    v.add_argument("cache_dir", help="directory written by `deltakd cache build`")
    v.set_defaults(func=_verify)


def _build(args: argparse.Namespace) -> int:
    import logging

    from deltakd.config import load_config
    from deltakd.references.cache.build import build_cache

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = load_config(args.config, args.overrides)
    result = build_cache(config, overwrite=args.overwrite)
    m = result.manifest
    if not m.complete:  # a rank > 0 of a multi-rank build: rank 0 writes the manifest
        print(f"cache {result.cache_dir}: this rank built {result.built_shards} shards and kept "
              f"{result.kept_shards} in {result.seconds:.1f}s; rank 0 writes the manifest")  # fmt: skip
        return 0
    print(f"cache {result.cache_dir}: {m.dataset['unique_rows']} rows, {m.response_tokens} "
          f"response tokens, k={m.target['k']}, {m.encoding['index_dtype']}/"
          f"{m.encoding['value_dtype']}, {m.bytes_per_token():.1f} bytes/token, "
          f"{m.total_bytes / 1e6:.2f} MB in {len(m.shards)} shards ({result.built_shards} built, "
          f"{result.kept_shards} kept){_tail_note(m)} in {result.seconds:.1f}s")  # fmt: skip
    return 0


def _verify(args: argparse.Namespace) -> int:
    from deltakd.references.cache.reader import CacheReader

    reader = CacheReader(args.cache_dir, verify=True)
    reader.verify_all()
    m = reader.manifest
    t = m.target
    print(f"cache {args.cache_dir}: OK, {len(m.shards)} shards, {len(reader)} rows, "
          f"{m.response_tokens} response tokens, {m.bytes_per_token():.1f} bytes/token; "
          f"{t['method']} alpha={t['alpha']} temperature={t['temperature']} k={t['k']}"
          f"{_tail_note(m)}, dataset {m.dataset['spec']!r}")  # fmt: skip
    return 0


def _tail_note(m: CacheManifest) -> str:
    if not m.tail_rank:
        return ", tail bucket"
    return f", rank-{m.tail_rank} tail model ({int(m.tail_model.get('bytes', 0)) / 1e6:.2f} MB)"
