"""Cache format pieces without models: encodings, settings, keys, shard round trip."""

from __future__ import annotations

import types

import pytest
import torch

from deltakd.errors import CacheError, ConfigError
from deltakd.references.cache.format import (
    CacheSettings,
    bytes_per_position,
    resolve_index_dtype,
    row_key,
)


def test_index_dtype_follows_the_vocabulary():
    assert resolve_index_dtype("auto", 1024) == "uint16"
    assert resolve_index_dtype("auto", 65536) == "uint16"
    assert resolve_index_dtype("auto", 151665) == "uint24"  # Qwen2.5
    assert resolve_index_dtype("auto", (1 << 24) + 1) == "int32"
    assert resolve_index_dtype("int32", 1024) == "int32"
    with pytest.raises(ConfigError, match=r"cannot hold token ids of a 151665-token"):
        resolve_index_dtype("uint16", 151665)
    # k = 64: 64 × (2 + 2) + 4 (tail) + 4 (position) bytes; int32 ids for large vocabularies.
    assert bytes_per_position(64, "uint16", "fp16") == 264
    assert bytes_per_position(64, "uint24", "fp16") == 328
    assert bytes_per_position(64, "int32", "fp16") == 392
    assert bytes_per_position(64, "uint16", "fp32") == 392


@pytest.mark.parametrize(
    ("index_dtype", "top"), [("uint16", 65535), ("uint24", (1 << 24) - 1), ("int32", 151664)]
)
def test_shard_round_trip_is_exact_for_every_id(tmp_path, index_dtype, top):
    from safetensors.torch import load_file

    from deltakd.references.cache.writer import CachedRow, decode_indices, encode_rows, write_shard

    ids = torch.tensor([[top, 0, 1, top - 1]])
    row = CachedRow(row_key([5, 6]), 3, torch.tensor([1]), ids,
                    torch.tensor([[-0.1, -2.5, -3.0, -9.75]]), torch.tensor([0.25]))  # fmt: skip
    empty = CachedRow(row_key([7]), 4, torch.zeros(0, dtype=torch.long), torch.zeros(0, 4),
                      torch.zeros(0, 4), torch.zeros(0))  # fmt: skip
    tensors = encode_rows([row, empty], 4, index_dtype, "fp32")
    size = write_shard(tmp_path / "s.safetensors", tensors, {"format": "x"})
    assert size == (tmp_path / "s.safetensors").stat().st_size
    assert not (tmp_path / ".tmp-s.safetensors").exists()
    back = load_file(tmp_path / "s.safetensors")
    assert torch.equal(decode_indices(back["indices"]), ids)
    assert back["row_offsets"].tolist() == [0, 1, 1]
    assert back["row_keys"][1].numpy().tobytes() == row_key([7])


def test_row_key_depends_on_every_token_and_accepts_lists_and_tensors():
    a = row_key([1, 2, 3])
    assert a == row_key(torch.tensor([1, 2, 3])) and len(a) == 16
    assert a != row_key([1, 2, 4]) and a != row_key([1, 2]) and a != row_key([1, 2, 3, 0])


def test_settings_are_validated():
    cfg = types.SimpleNamespace(output_dir="runs/x", per_device_batch_size=4, cache={})
    s = CacheSettings.from_config(cfg)
    assert (s.dir, s.k, s.value_dtype, s.batch_size) == ("runs/x/target_cache", 64, "fp16", 4)
    assert (
        CacheSettings.from_config(
            types.SimpleNamespace(**{**vars(cfg), "cache": {"k": "V"}})
        ).resolve_k(320)
        == 320
    )
    for bad, match in [({"kk": 3}, r"unknown config key 'cache.kk'. Did you mean 'cache.k'"),
                       ({"k": "many"}, r"'cache.k' = 'many'"),
                       ({"value_dtype": "int8"}, r"'cache.value_dtype'"),
                       ({"source": "cache"}, r"'cache.source'")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            CacheSettings.from_config(types.SimpleNamespace(**{**vars(cfg), "cache": bad}))


def test_missing_or_foreign_manifest_is_refused(tmp_path):
    from deltakd.references.cache.format import read_manifest

    with pytest.raises(
        CacheError, match=r"manifest.json is missing. Build it with `deltakd cache build"
    ):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(CacheError, match=r"not a readable deltakd cache manifest .*rebuild"):
        read_manifest(tmp_path)


def test_every_cache_setting_is_documented_in_usage():
    import dataclasses
    from pathlib import Path

    from deltakd.references.cache.format import CacheSettings

    usage = (Path(__file__).parents[3] / "docs" / "USAGE.md").read_text(encoding="utf-8")
    missing = [
        f.name for f in dataclasses.fields(CacheSettings) if f"`cache.{f.name}`" not in usage
    ]
    assert not missing, f"docs/USAGE.md's cache table lacks {missing}"
