"""Format version 2: Elias–Fano ids, companded b-bit log-probs, positions as spans."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from deltakd.errors import CacheError
from deltakd.references.cache import packing
from deltakd.references.cache.format import (
    FORMAT_VERSION,
    PACKED_FORMAT_VERSION,
    bytes_per_position,
    read_manifest,
    row_key,
)


def test_ids_round_trip_exactly_at_the_edges_of_the_vocabulary():
    rng = np.random.default_rng(0)
    v, k = 151936, 64
    ids = np.sort(np.stack([rng.choice(v, k, replace=False) for _ in range(50)]), axis=1)
    ids[0], ids[1] = np.arange(k), np.arange(v - k, v)  # densest at both ends
    packed = packing.encode_ids(ids, v)
    assert packed.shape == (50, packing.ef_bytes(v, k)) and packed.dtype == np.uint8
    assert np.array_equal(packing.decode_ids(packed, k, v), ids)
    # Within 2 bits per id of log2 C(V, k), the least any code of k-subsets can use.
    bound = (math.lgamma(v + 1) - math.lgamma(k + 1) - math.lgamma(v - k + 1)) / math.log(2)
    assert packing.ef_bytes(v, k) * 8 <= bound + 2 * k + 8
    assert packing.ef_bytes(v, k) == 106  # where uint24 ids take 192


@pytest.mark.parametrize("bits", [6, 7, 8])
def test_values_keep_the_mass_split_and_bound_the_error(bits):
    rng = np.random.default_rng(bits)
    p = rng.dirichlet(np.full(80, 0.3), size=200)
    top = -np.sort(-p, axis=1)[:, :64]
    lp = np.log(np.maximum(top, 1e-17)).astype(np.float32)
    tail = (1 - top.sum(1)).astype(np.float16)
    levels = packing.encode_values(lp, bits)
    assert levels.shape == (200, 64 * bits // 8) and levels.dtype == np.uint8
    back = packing.decode_values(levels, tail, 64, bits)
    assert np.isfinite(back).all()
    # The top-k mass is 1 − the stored tail, whatever the rounding.
    np.testing.assert_allclose(np.exp(back.astype(np.float64)).sum(1),
                               1 - tail.astype(np.float64), rtol=1e-5)  # fmt: skip
    # Relative to the top entry, the step in a = (p/p_max)^(1/3) is 1/L:
    # |Δ log(p/p_max)| ≤ −3·log(1 − 1/(2·L·a)) away from level 0.
    rel, rel_back = lp - lp.max(1, keepdims=True), back - back.max(1, keepdims=True)
    a = np.exp(rel / 3)
    big = a > 4 / (1 << bits)
    bound = -3 * np.log1p(-1 / (2 * ((1 << bits) - 1) * np.where(big, a, 1.0))) + 1e-4
    assert (np.abs(rel_back - rel) <= bound)[big].all()


def test_positions_spans_round_trip():
    for pos in ([], [4], [3, 4, 5, 9, 10, 20], list(range(7, 300))):
        s, n = packing.positions_to_spans(np.array(pos, dtype=np.int64))
        assert packing.spans_to_positions(s, n).tolist() == pos
    assert packing.positions_to_spans(np.array([3, 4, 5, 9]))[1].tolist() == [3, 1]


def test_bytes_per_position_at_qwen_vocabulary():
    v = 151936
    assert bytes_per_position(64, "uint24", "fp16") == 328  # version 1: 24-bit ids + fp16
    assert bytes_per_position(64, "packed", "q6", vocab_size=v) == 106 + 48 + 2
    assert bytes_per_position(64, "packed", "q8", vocab_size=v) == 106 + 64 + 2
    assert bytes_per_position(64, "packed", "fp16", vocab_size=v) == 106 + 128 + 2
    with pytest.raises(ValueError, match="vocab_size"):
        bytes_per_position(64, "packed", "q6")


def _rows(v: int, k: int):
    from deltakd.references.cache.writer import CachedRow

    g = torch.Generator().manual_seed(0)
    rows = []
    for r, n in enumerate((5, 0, 9)):
        logits = torch.randn(n, v, generator=g) * 3
        lp = torch.log_softmax(logits, -1)
        top, idx = lp.topk(k, -1)
        pos = torch.tensor([1, 2, 3, 7, 8, 11, 12, 13, 14][:n])
        rows.append(CachedRow(row_key([r, 1]), r, pos, idx, top, 1 - top.exp().sum(-1)))
    return rows


@pytest.mark.parametrize("value_dtype", ["fp32", "q8", "q6"])
def test_packed_shard_round_trip(tmp_path, value_dtype):
    from safetensors.torch import load_file

    from deltakd.references.cache.writer import decode_packed_rows, encode_rows, write_shard

    v, k = 3000, 16
    rows = _rows(v, k)
    write_shard(tmp_path / "s.safetensors", encode_rows(rows, k, "packed", value_dtype), {})
    t = load_file(tmp_path / "s.safetensors")
    assert "positions" not in t and t["tail_mass"].dtype == torch.float16
    offsets, spans = t["row_offsets"].tolist(), t["row_spans"].tolist()
    for i, row in enumerate(rows):
        d = decode_packed_rows(t, offsets[i], offsets[i + 1], spans[i], spans[i + 1], k,
                               value_dtype)  # fmt: skip
        assert torch.equal(d["positions"], row.positions.long())
        # The same entries, most probable first (ties aside).
        assert torch.equal(d["indices"].sort(1).values, row.indices.sort(1).values)
        tol = {"fp32": 1e-6, "q8": 0.2, "q6": 0.8}[value_dtype]
        got = torch.full((len(row.positions), v), -99.0).scatter(1, d["indices"], d["logprobs"])
        want = torch.full((len(row.positions), v), -99.0).scatter(1, row.indices, row.logprobs)
        near = want > want.max(1, keepdim=True).values - 3  # the entries that carry the mass
        if near.any():
            assert (got - want).abs()[near].max() <= tol
        assert (d["logprobs"][:, :-1] >= d["logprobs"][:, 1:]).all()
        torch.testing.assert_close(d["tail_mass"], row.tail_mass, atol=1e-3, rtol=1e-3)


def test_packed_cache_builds_and_serves_the_same_targets(cache_overrides, tmp_path):
    from deltakd.losses import SparseTarget, delta_target
    from deltakd.references.cache import build_cache
    from deltakd.references.cache.source import from_config

    from .conftest import make_config
    from .test_cache import _batches, _local, _mask

    config = make_config(cache_overrides, tmp_path,
                         cache={"index_dtype": "packed", "value_dtype": "fp32"})  # fmt: skip
    m = build_cache(config, progress=False).manifest
    assert m.version == PACKED_FORMAT_VERSION and m.encoding["position_dtype"] == "spans"
    assert read_manifest(config.cache["dir"]).version == PACKED_FORMAT_VERSION
    source = from_config(config, ("teacher_ft", "teacher_raw", "student_raw"), torch.device("cpu"))
    local = _local(config)
    for key, batch in enumerate(_batches(config)):
        got = source.fetch(key, batch).target
        ref = local.fetch(key, batch).logits
        z = delta_target(ref["teacher_ft"], ref["teacher_raw"], ref["student_raw"], alpha=0.7)
        want = SparseTarget.from_logits(z[:, :-1], 8, temperature=1.5)
        mask = _mask(batch)
        assert torch.equal(got.indices[:, :-1][mask].sort(-1).values,
                           want.indices[mask].sort(-1).values)  # fmt: skip
        torch.testing.assert_close(got.logprobs[:, :-1][mask], want.logprobs[mask],
                                   atol=1e-5, rtol=0)  # fmt: skip
        torch.testing.assert_close(got.tail_mass[:, :-1][mask], want.tail_mass[mask],
                                   atol=1e-3, rtol=1e-3)  # fmt: skip
    source.close()


def test_version_one_manifest_is_read_and_an_unknown_version_refused(built_cache, tmp_path):
    import shutil

    config, _ = built_cache
    old = read_manifest(config.cache["dir"])
    assert old.version == FORMAT_VERSION == 1  # unpacked caches keep version 1 and their hash
    copy = tmp_path / "c"
    shutil.copytree(config.cache["dir"], copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["version"] = 3
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CacheError, match=r"format version 3.*rebuild the cache"):
        read_manifest(copy)


def test_quantised_values_store_int8_tail_coefficients(tmp_path):
    from safetensors.torch import load_file

    from deltakd.references.cache.writer import decode_packed_rows, encode_rows, write_shard

    rows = _rows(3000, 16)
    g = torch.Generator().manual_seed(1)
    for r in rows:
        r.tail_coeffs = torch.randn(len(r.positions), 8, generator=g) * 5
    write_shard(tmp_path / "s.safetensors", encode_rows(rows, 16, "packed", "q6", 8), {})
    t = load_file(tmp_path / "s.safetensors")
    assert t["tail_coeffs"].dtype == torch.int8 and t["tail_coeff_scale"].shape == (8,)
    offsets, spans = t["row_offsets"].tolist(), t["row_spans"].tolist()
    for i, row in enumerate(rows):
        d = decode_packed_rows(t, offsets[i], offsets[i + 1], spans[i], spans[i + 1], 16, "q6")
        # Half a step of 1/127 of the component's largest |c| in the shard.
        step = torch.cat([r.tail_coeffs for r in rows]).abs().amax(0) / 127
        assert ((d["tail_coeffs"] - row.tail_coeffs).abs() <= 0.5001 * step).all()
    assert bytes_per_position(64, "packed", "q5", 8, vocab_size=151936) == 106 + 40 + 8 + 2
