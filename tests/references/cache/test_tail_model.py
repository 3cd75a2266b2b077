"""Caches with a low-rank tail model (`cache.tail_rank`): stored, read back, checked, trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from deltakd.errors import CacheError, ConfigError
from tests.references.cache.conftest import make_config
from tests.references.cache.test_cache import _batches, _local, _mask

RANK = 12


@pytest.fixture(scope="module")
def tail_cache(cache_overrides: dict[str, Any], tmp_path_factory: pytest.TempPathFactory):
    """(config, BuildResult) of a k=8 fp32 cache with a rank-12 tail model, in 3 shards."""
    from deltakd.references.cache import build_cache

    out = tmp_path_factory.mktemp("tail_cache")
    config = make_config(cache_overrides, out, cache={"value_dtype": "fp32", "tail_rank": RANK})
    return config, build_cache(config, progress=False)


def _dense_logp(config: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from deltakd.losses import delta_target

    local = _local(config)
    ref = local.fetch(0, batch).logits
    local.close()
    z = delta_target(ref["teacher_ft"], ref["teacher_raw"], ref["student_raw"], alpha=0.7)
    return torch.log_softmax(z[:, :-1][_mask(batch)] / 1.5, -1)  # (n, V)


def _kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> float:
    p = p_logp.exp()
    return float(torch.where(p > 0, p * (p_logp - q_logp), 0.0).sum(-1).mean())


def test_tail_model_round_trip_and_lower_kl_than_the_bucket(tail_cache, built_cache, tiny_world):
    from deltakd.references.cache import CacheReferences

    config, result = tail_cache
    m = result.manifest
    v = tiny_world["vocab_size"]
    assert m.tail_rank == RANK and m.encoding["bytes_per_position"] == 8 * (2 + 4) + RANK * 4 + 8
    assert m.tail_model["file"] == "tail_model.safetensors" and len(m.tail_model["sha256"]) == 64
    source, bucket = (
        CacheReferences(config.cache["dir"]),
        CacheReferences(built_cache[0].cache["dir"]),
    )
    basis, offset = source.reader.tail_model
    assert basis.shape == (RANK, v) and offset.shape == (v,)
    kl_model = kl_bucket = 0.0
    for batch in _batches(config)[:2]:
        got = source.fetch(0, batch).target
        assert got.has_tail_model and got.tail_coeffs.shape == (*batch["input_ids"].shape, RANK)
        flat = got.map_positions(lambda t: t[:, :-1][_mask(batch)])  # noqa: B023
        dense = _dense_logp(config, batch)
        # The stored coefficients are the dense target's coordinates in the stored basis.
        want = (dense.clamp_min(-80) - offset) @ basis.T
        torch.testing.assert_close(flat.tail_coeffs, want, atol=1e-4, rtol=1e-4)
        kl_model += _kl(dense, flat.dense_logprobs())
        old = bucket.fetch(0, batch).target.map_positions(lambda t: t[:, :-1][_mask(batch)])  # noqa: B023
        kl_bucket += _kl(dense, old.dense_logprobs(vocab_size=v))
    assert kl_model < 0.5 * kl_bucket
    source.close()
    bucket.close()


def test_run_and_cache_must_agree_on_the_tail_model(tail_cache, built_cache):
    from deltakd.references.cache.source import from_config

    config, _ = tail_cache
    no_model = config.replace(cache={**config.cache, "tail_rank": 0})
    with pytest.raises(
        CacheError, match=r"cache.tail_rank is 12 in the cache but 0.*Set cache.tail_rank=12"
    ):
        from_config(no_model, ("teacher_ft", "teacher_raw", "student_raw"), torch.device("cpu"))
    bucket = built_cache[0]
    wants_model = bucket.replace(cache={**bucket.cache, "tail_rank": RANK})
    with pytest.raises(CacheError, match=r"cache.tail_rank is 0 in the cache but 12"):
        from_config(wants_model, ("teacher_ft", "teacher_raw", "student_raw"), torch.device("cpu"))


def test_damaged_or_missing_tail_model_is_named(tail_cache, tmp_path):
    import shutil

    from deltakd.references.cache import CacheReferences

    config, _ = tail_cache
    copy = tmp_path / "copy"
    shutil.copytree(config.cache["dir"], copy)
    path = copy / "tail_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"tail model tail_model.safetensors .* is corrupt"):
        CacheReferences(copy)
    path.unlink()
    with pytest.raises(CacheError, match=r"tail_model.safetensors is missing.*deltakd cache build"):
        CacheReferences(copy)


def test_resumed_build_reuses_the_fitted_model(cache_overrides, tail_cache, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from deltakd.references.cache import build as build_mod

    config = make_config(
        cache_overrides, tmp_path, cache={"value_dtype": "fp32", "tail_rank": RANK}
    )
    fits: list[int] = []
    real_fit, real_write = build_mod._fit_tail_model, build_mod.write_shard

    def counting_fit(*args: Any, **kwargs: Any) -> Any:
        fits.append(1)
        return real_fit(*args, **kwargs)

    def dies_on_second_shard(path: Any, *args: Any, **kwargs: Any) -> int:
        if Path(path).name == "shard-00001.safetensors":
            raise KeyboardInterrupt("simulated kill")
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(build_mod, "_fit_tail_model", counting_fit)
    monkeypatch.setattr(build_mod, "write_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build_mod.build_cache(config, progress=False)
    monkeypatch.setattr(build_mod, "write_shard", real_write)
    result = build_mod.build_cache(config, progress=False)
    assert fits == [1] and (result.kept_shards, result.built_shards) == (1, 2)
    ours = load_file(Path(config.cache["dir"]) / "tail_model.safetensors")
    theirs = load_file(Path(tail_cache[0].cache["dir"]) / "tail_model.safetensors")
    assert all(torch.equal(ours[n], theirs[n]) for n in ("basis", "offset"))


def test_bad_tail_settings_are_refused(cache_overrides, tmp_path):
    from deltakd.references.cache import build_cache

    with pytest.raises(ConfigError, match=r"cache.tail_rank' = -1 is not allowed"):
        build_cache(make_config(cache_overrides, tmp_path, cache={"tail_rank": -1}))
    with pytest.raises(ConfigError, match=r"needs a tail, but cache.k = V"):
        build_cache(make_config(cache_overrides, tmp_path, cache={"tail_rank": 4, "k": "V"}))
    with pytest.raises(ConfigError, match=r"at least 300 response positions"):
        build_cache(make_config(cache_overrides, tmp_path, limit=2,
                                cache={"tail_rank": 300, "tail_fit_positions": 9999}))  # fmt: skip


def test_training_from_the_tail_model_is_closer_to_dense_than_the_bucket(
    tail_cache, built_cache, cache_overrides, tmp_path
):
    """First-step loss: dense (local references) vs cache with and without the tail model."""
    from deltakd.train.api import train

    common = dict(max_steps=1, logging_steps=1, save_steps=0, resume="never", learning_rate=1e-3,
                  per_device_batch_size=3)  # fmt: skip
    first = {}
    for name, cfg in (("model", tail_cache[0]), ("bucket", built_cache[0])):
        run = cfg.replace(references="cache", output_dir=str(tmp_path / name), **common)
        first[name] = train(run).losses()[0][1]
    dense = train(make_config(cache_overrides, tmp_path / "dense", **common)).losses()[0][1]
    assert abs(first["model"] - dense) < 0.5 * abs(first["bucket"] - dense)
    # The fused loss (from hidden states) takes the same tail-model target.
    fused = tail_cache[0].replace(references="cache", output_dir=str(tmp_path / "fused"),
                                  fused_loss=True, **common)  # fmt: skip
    assert train(fused).losses()[0][1] == pytest.approx(first["model"], rel=1e-5)
