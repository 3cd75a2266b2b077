"""A cache built by several ranks (each its own shards) equals the one a single process builds."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from deltakd.errors import CacheError

from .conftest import make_config


def test_rank_shards_cover_every_shard_once():
    from deltakd.references.cache.build import rank_shards

    for n, world in ((1, 1), (3, 2), (10, 4), (2, 8)):
        got = sorted(s for r in range(world) for s in rank_shards(n, r, world))
        assert got == list(range(n))
        assert max(len(rank_shards(n, r, world)) for r in range(world)) <= -(-n // world)


def test_two_ranks_build_the_same_cache_as_one(cache_overrides, tmp_path, monkeypatch, caplog):
    from deltakd.references.cache import build_cache
    from deltakd.references.cache.format import read_manifest

    single = make_config(cache_overrides, tmp_path / "one")
    want = build_cache(single, progress=False).manifest
    split = make_config(cache_overrides, tmp_path / "two")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    r1 = build_cache(split, progress=False)
    assert r1.built_shards == 1 and not r1.manifest.complete  # shard 1 of 0, 1, 2
    assert not (tmp_path / "two" / "cache" / "manifest.json").exists()
    monkeypatch.setenv("RANK", "0")
    with caplog.at_level("INFO", logger="deltakd.cache"):
        r0 = build_cache(split, progress=False)
    assert r0.built_shards == 2 and r0.manifest.complete
    assert "rows/s" in caplog.text
    got = read_manifest(split.cache["dir"])
    assert got.settings_hash() == want.settings_hash()
    assert [(s.file, s.rows, s.positions) for s in got.shards] == [
        (s.file, s.rows, s.positions) for s in want.shards
    ]
    for info in got.shards:
        a = load_file(tmp_path / "two" / "cache" / info.file)
        b = load_file(tmp_path / "one" / "cache" / info.file)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_rank_outside_world_is_refused(cache_overrides, tmp_path, monkeypatch):
    from deltakd.references.cache import build_cache

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(CacheError, match="RANK=2 is not within WORLD_SIZE=2"):
        build_cache(make_config(cache_overrides, tmp_path), progress=False)
