"""Offline target cache: round trip, exactness at k = V, refusals, corruption, resume, CLI."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from deltakd.errors import CacheError, ConfigError
from tests.references.cache.conftest import make_config, write_jsonl


def _batches(config: Any, size: int = 4) -> list[dict[str, torch.Tensor]]:
    """The config's training rows collated as the trainer does (dataset order)."""
    from deltakd.data.tokenize import ChatCollator
    from deltakd.data.vocab import load_tokenizer
    from deltakd.references.cache.build import encode_dataset

    tok = load_tokenizer(config.tokenizer_path)
    data = encode_dataset(config, tok)
    feats = [{"input_ids": i, "assistant_mask": m, "row_index": r}
             for i, m, r in zip(data.ids, data.masks, data.row_indices)]  # fmt: skip
    collate = ChatCollator(pad_token_id=tok.pad_token_id)
    return [collate(feats[j : j + size]) for j in range(0, len(feats), size)]


def _local(config: Any):
    from deltakd.references.local import LocalReferences

    roles = ("teacher_ft", "teacher_raw", "student_raw")
    return LocalReferences({r: getattr(config, r) for r in roles})


def _mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["assistant_mask"][:, 1:].bool() & batch["attention_mask"][:, 1:].bool()


def test_round_trip_equals_direct_sparse_target(built_cache):
    """Cache → CacheReferences gives SparseTarget.from_logits(delta_target(...)) computed directly."""
    from deltakd.losses import SparseTarget, delta_target
    from deltakd.references.cache.source import from_config

    config, result = built_cache
    m = result.manifest
    assert (m.dataset["rows"], m.dataset["unique_rows"], len(m.shards)) == (11, 10, 3)
    assert m.encoding == {"index_dtype": "uint16", "value_dtype": "fp32", "tail_dtype": "fp32",
                          "position_dtype": "int32", "bytes_per_position": 8 * (2 + 4) + 8}  # fmt: skip
    source = from_config(config, ("teacher_ft", "teacher_raw", "student_raw"), torch.device("cpu"))
    local = _local(config)
    checked = 0
    batches = _batches(config)
    for key, batch in enumerate(batches):
        if key % 2 == 0:  # even batches through the background worker
            source.prefetch(key, batch)
        got = source.fetch(key, batch).target
        ref = local.fetch(key, batch).logits
        z = delta_target(ref["teacher_ft"], ref["teacher_raw"], ref["student_raw"], alpha=0.7)
        want = SparseTarget.from_logits(z[:, :-1], 8, temperature=1.5)
        mask = _mask(batch)
        assert got.shape == batch["input_ids"].shape and got.temperature == 1.5
        assert torch.equal(got.indices[:, :-1][mask], want.indices[mask])
        torch.testing.assert_close(
            got.logprobs[:, :-1][mask], want.logprobs[mask], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            got.tail_mass[:, :-1][mask], want.tail_mass[mask], atol=1e-5, rtol=0
        )
        # Positions outside the responses hold a finite valid filler.
        assert torch.isfinite(got.logprobs).all() and torch.isfinite(got.tail_mass).all()
        checked += int(mask.sum())
    dup = sum(int(_mask(b)[i].sum()) for b in _batches(config)
              for i in range(len(b["row_index"])) if int(b["row_index"][i]) == 10)  # fmt: skip
    assert dup > 0 and checked == m.dataset["response_tokens"] + dup  # the duplicate is served too
    # A key prefetched for one batch and fetched with another gives the other's targets.
    source.prefetch(99, batches[0])
    again = source.fetch(99, batches[1]).target
    assert torch.equal(again.indices, source.fetch(100, batches[1]).target.indices)
    source.close()


def test_left_padded_batch_gets_the_same_targets(built_cache):
    """Rows are found by the tokens under the attention mask, wherever the padding sits."""
    from deltakd.references.cache import CacheReferences

    config, _ = built_cache
    batch = _batches(config)[0]
    source = CacheReferences(config.cache["dir"])
    right = source.fetch(0, batch).target
    lengths = batch["attention_mask"].sum(1)
    t = batch["input_ids"].shape[1]
    left = {name: torch.zeros_like(batch[name]) for name in ("input_ids", "attention_mask",
                                                              "assistant_mask")}  # fmt: skip
    for b, n in enumerate(lengths.tolist()):
        for name in left:
            left[name][b, t - n :] = batch[name][b, :n]
    got = source.fetch(1, left).target
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(got.indices[b, t - n :], right.indices[b, :n])
        assert torch.equal(got.logprobs[b, t - n :], right.logprobs[b, :n])


@pytest.fixture(scope="module")
def full_vocab_cache(cache_overrides, tmp_path_factory):
    """A k = V fp32 cache (batch size 4, so the trainer test uses it too)."""
    from deltakd.references.cache import build_cache

    out = tmp_path_factory.mktemp("full_vocab")
    config = make_config(cache_overrides, out, cache={"k": "V", "value_dtype": "fp32"},
                         per_device_batch_size=4)  # fmt: skip
    return config, build_cache(config, progress=False).manifest


def test_k_equal_V_cache_gives_exactly_the_dense_loss(full_vocab_cache, tiny_world):
    from transformers import AutoModelForCausalLM

    from deltakd.losses import delta_kd_loss, kd_loss
    from deltakd.references.cache import CacheReferences

    config, manifest = full_vocab_cache
    assert manifest.target["k"] == tiny_world["vocab_size"]
    source, local = CacheReferences(config.cache["dir"]), _local(config)
    student = AutoModelForCausalLM.from_pretrained(config.student_raw)
    torch.manual_seed(0)
    for key, batch in enumerate(_batches(config)[:2]):
        with torch.no_grad():
            out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1] + torch.randn_like(out.logits[:, :-1])  # != student_raw
        target = source.fetch(key, batch).target
        ref = local.fetch(key, batch).logits
        mask = _mask(batch)
        sparse = kd_loss(logits, _trim(target), temperature=1.5, mask=mask)
        dense = delta_kd_loss(logits, *(ref[r][:, :-1] for r in ("teacher_ft", "teacher_raw",
                              "student_raw")), alpha=0.7, temperature=1.5, mask=mask)  # fmt: skip
        assert dense.item() > 0.01
        torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)


def _trim(target: Any) -> Any:
    from deltakd.losses import SparseTarget

    return SparseTarget(target.indices[:, :-1], target.logprobs[:, :-1], target.tail_mass[:, :-1],
                        target.temperature)  # fmt: skip


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"alpha": 0.5}, "target.alpha"),
        ({"temperature": 1.0}, "target.temperature"),
        ({"cache": {"k": 16}}, "target.k"),
        ({"method": "kd"}, "target.method"),
        ({"max_length": 48}, "dataset.max_length"),
    ],
)
def test_manifest_mismatch_is_refused_naming_the_field(built_cache, change, field):
    from deltakd.references.cache.source import from_config

    config, _ = built_cache
    cache = {**config.cache, **change.pop("cache", {})}
    other = config.replace(cache=cache, **change)
    with pytest.raises(CacheError, match=rf"{field} is .* in the cache but .*deltakd cache build"):
        from_config(other, ("teacher_ft", "teacher_raw", "student_raw"), torch.device("cpu"))


def test_other_tokenizer_is_refused(built_cache, tmp_path):
    from deltakd.references.cache.source import from_config
    from tests.conftest import train_tokenizer

    config, _ = built_cache
    train_tokenizer(tmp_path / "tok", vocab_size=300)
    with pytest.raises(CacheError, match=r"tokenizer.fingerprint is .*Rebuild"):
        from_config(config.replace(tokenizer=str(tmp_path / "tok")), ("teacher_ft",),
                    torch.device("cpu"))  # fmt: skip


def test_changed_dataset_content_is_refused(cache_overrides, tmp_path):
    from deltakd.references.cache import build_cache
    from deltakd.references.cache.source import CacheReferences, from_config
    from tests.references.cache.conftest import ROWS

    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:3])
    config = make_config(cache_overrides, tmp_path, dataset=str(data))
    build_cache(config, progress=False)
    write_jsonl(data, [ROWS[0], ROWS[1], (ROWS[2][0], "seven plus six is twelve.")])
    with pytest.raises(CacheError, match=r"dataset.hash is .* in the cache but .* for this run"):
        from_config(config, ("teacher_ft",), torch.device("cpu"))
    # Without the up-front check, the changed row is refused when it is fetched.
    source = CacheReferences(config.cache["dir"])
    with pytest.raises(
        CacheError, match=r"batch row 2 \(dataset row 2\).*not in the offline cache"
    ):
        source.fetch(0, _batches(config)[0])


def test_other_model_is_refused(built_cache, tiny_world):
    from deltakd.references.cache.source import from_config

    config, _ = built_cache
    other = config.replace(teacher_raw=str(tiny_world["teacher_ft"]))
    with pytest.raises(CacheError, match=r"the teacher_raw model differs"):
        from_config(other, ("teacher_ft", "teacher_raw", "student_raw"), torch.device("cpu"))


def test_kd_and_parallelogram_targets(cache_overrides, tmp_path):
    """kd stores teacher_ft's distribution; the frozen `delta` variant stores delta_kd's z*."""
    from deltakd.losses import SparseTarget
    from deltakd.references.cache import CacheReferences, build_cache

    small = {"limit": 2, "cache": {"value_dtype": "fp32"}}
    kd = make_config(cache_overrides, tmp_path / "kd", method="kd", **small)
    assert build_cache(kd, progress=False).manifest.models.keys() == {"teacher_ft"}
    para = make_config(cache_overrides, tmp_path / "p", method="parallelogram", variant="delta",
                       **small)  # fmt: skip
    build_cache(para, progress=False)
    dkd = make_config(cache_overrides, tmp_path / "d", **small)
    build_cache(dkd, progress=False)
    batch = _batches(kd)[0]
    mask = _mask(batch)
    logits = _local(kd).fetch(0, batch).logits["teacher_ft"][:, :-1]
    want = SparseTarget.from_logits(logits, 8, temperature=1.5)
    got = _trim(CacheReferences(kd.cache["dir"]).fetch(0, batch).target)
    assert torch.equal(got.indices[mask], want.indices[mask])
    torch.testing.assert_close(got.logprobs[mask], want.logprobs[mask], atol=1e-5, rtol=0)
    a = CacheReferences(para.cache["dir"]).fetch(0, batch).target
    b = CacheReferences(dkd.cache["dir"]).fetch(0, batch).target
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_nan_references_are_refused_at_build_time(cache_overrides, tiny_world, tmp_path):
    from deltakd.errors import NonFiniteError
    from deltakd.references.base import ReferenceBatch, ReferenceSource
    from deltakd.references.cache import build_cache

    class NaNReferences(ReferenceSource):
        roles = ("teacher_ft", "teacher_raw", "student_raw")

        def fetch(self, key: int, batch: Any) -> ReferenceBatch:
            b, t = batch["input_ids"].shape
            logits = torch.randn(b, t, tiny_world["vocab_size"])
            logits[:, 3:] = float("nan")
            return ReferenceBatch(logits={r: logits for r in self.roles})

    config = make_config(cache_overrides, tmp_path, limit=2)
    with pytest.raises(NonFiniteError, match=r"dataset row \d contains NaN.*reference_dtype=fp32"):
        build_cache(config, references=NaNReferences(), progress=False)
    assert not list((tmp_path / "cache").glob("*.safetensors"))


def test_uncacheable_settings_are_refused(built_cache):
    from deltakd.references.cache.build import check_cacheable

    config, _ = built_cache
    with pytest.raises(ConfigError, match=r"divergence.*fkl"):
        check_cacheable(config.replace(divergence="rkl"))
    with pytest.raises(ConfigError, match="method 'sft' cannot train from an offline cache"):
        check_cacheable(config.replace(method="sft"))
    with pytest.raises(ConfigError, match=r"divergence 'rkl' .*method 'parallelogram'"):
        check_cacheable(config.replace(method="parallelogram", variant="delta_rkl"))
    with pytest.raises(ConfigError, match="live student"):
        check_cacheable(config.replace(method="parallelogram", variant="live_shift_sg"))


def _copy(built_cache, tmp_path: Path) -> Path:
    config, _ = built_cache
    dst = tmp_path / "copy"
    shutil.copytree(config.cache["dir"], dst)
    return dst


def test_corrupted_shard_is_reported_by_name(built_cache, tmp_path):
    from deltakd.references.cache import CacheReferences

    config, _ = built_cache
    path = _copy(built_cache, tmp_path)
    shard = path / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    for i in range(len(raw) - 64, len(raw) - 32):  # flip bytes in the tensor data
        raw[i] ^= 0xFF
    shard.write_bytes(bytes(raw))
    source = CacheReferences(path)
    with pytest.raises(
        CacheError, match=r"cache shard shard-00001\.safetensors .* is corrupt: its sha256"
    ):
        for key, batch in enumerate(_batches(config)):
            source.fetch(key, batch)
    # A damaged header is caught when the cache is opened.
    raw[8:40] = b"\x00" * 32
    shard.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match=r"cache shard shard-00001\.safetensors .* is corrupt"):
        CacheReferences(path)


def test_cli_cache_verify(built_cache, tmp_path, capsys):
    from deltakd.cli import main

    path = _copy(built_cache, tmp_path)
    assert main(["cache", "verify", str(path)]) == 0
    assert "OK, 3 shards, 10 rows" in capsys.readouterr().out
    shard = path / "shard-00002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x01
    shard.write_bytes(bytes(raw))
    assert main(["cache", "verify", str(path)]) == 2
    assert "shard-00002.safetensors" in capsys.readouterr().err


def test_missing_shard_is_reported_by_name(built_cache, tmp_path):
    from deltakd.references.cache import CacheReferences

    path = _copy(built_cache, tmp_path)
    (path / "shard-00002.safetensors").unlink()
    with pytest.raises(
        CacheError, match=r"cache shard shard-00002\.safetensors is missing.*cache build"
    ):
        CacheReferences(path)


def test_interrupted_build_resumes_to_the_same_cache(cache_overrides, built_cache, tmp_path,
                                                     monkeypatch):  # fmt: skip
    from deltakd.references.cache import build as build_mod

    config = make_config(cache_overrides, tmp_path, cache={"value_dtype": "fp32"})
    real = build_mod.write_shard
    calls = []

    def flaky(*args: Any, **kwargs: Any) -> int:
        if calls:
            raise KeyboardInterrupt("simulated kill after shard 1")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(build_mod, "write_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_mod.build_cache(config, progress=False)
    cache_dir = Path(config.cache["dir"])
    assert sorted(p.name for p in cache_dir.iterdir()) == ["shard-00000.safetensors"]
    monkeypatch.setattr(build_mod, "write_shard", real)
    result = build_mod.build_cache(config, progress=False)
    assert (result.kept_shards, result.built_shards) == (1, 2)
    _, full = built_cache
    # Same tensors and the same manifest; only the file checksums may differ, as safetensors
    # writes its metadata mapping in no fixed order.
    for info in result.manifest.shards:
        a = load_file(cache_dir / info.file)
        b = load_file(Path(built_cache[0].cache["dir"]) / info.file)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert _without_checksums(result.manifest) == _without_checksums(full.manifest)
    # A finished cache is not rebuilt.
    again = build_mod.build_cache(config, progress=False)
    assert (again.kept_shards, again.built_shards) == (3, 0)


def _without_checksums(manifest: Any) -> dict:
    d = dataclasses.asdict(manifest)
    for shard in d["shards"]:
        shard.pop("sha256")
    return d


def test_build_refuses_a_cache_of_other_settings_without_overwrite(cache_overrides, tmp_path):
    from deltakd.references.cache import build_cache

    config = make_config(cache_overrides, tmp_path, limit=2)
    assert build_cache(config, progress=False).built_shards == 1
    other = config.replace(alpha=0.2)
    with pytest.raises(
        CacheError, match=r"target.alpha: 0.7 there, 0.2 in this config.*--overwrite"
    ):
        build_cache(other, progress=False)
    result = build_cache(other, progress=False, overwrite=True)
    assert result.built_shards == 1 and result.manifest.target["alpha"] == 0.2


def test_cli_cache_build_fp16(cache_overrides, built_cache, tmp_path, capsys):
    """The command builds an fp16 cache with 3-byte ids: 5 bytes per entry, the same ids as the
    uint16/fp32 cache and values within fp16 rounding of its values."""
    import yaml

    from deltakd.cli import main
    from deltakd.references.cache import CacheReferences

    cfg = {**cache_overrides, "output_dir": str(tmp_path / "run"), "references": "cache"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    argv = ["cache", "build", str(path), "cache.k=8", "cache.rows_per_shard=100",
            "cache.index_dtype=uint24"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "10 rows" in out and "k=8, uint24/fp16" in out and "1 built" in out
    cache_dir = tmp_path / "run" / "target_cache"
    a, b = CacheReferences(cache_dir), CacheReferences(built_cache[0].cache["dir"])
    assert a.manifest.encoding["bytes_per_position"] == 8 * (3 + 2) + 8
    assert a.manifest.bytes_per_token() < b.manifest.bytes_per_token()
    batch = _batches(built_cache[0])[0]
    ta, tb = a.fetch(0, batch).target, b.fetch(0, batch).target
    assert torch.equal(ta.indices, tb.indices)
    torch.testing.assert_close(ta.logprobs, tb.logprobs, atol=1e-2, rtol=1e-3)
    assert not torch.equal(ta.logprobs, tb.logprobs)
    bad = ["cache", "build", str(path), "cache.k=8", "cache.bogus=1"]
    assert main(bad) == 2
    assert "unknown config key 'cache.bogus'" in capsys.readouterr().err


def test_trainer_from_cache_matches_local_at_k_V(full_vocab_cache, cache_overrides, tmp_path,
                                                 monkeypatch):  # fmt: skip
    """`references: cache` through `deltakd.train.train`: no reference model is loaded, and the
    first-step loss equals the one with local references."""
    from transformers import AutoModelForCausalLM

    from deltakd.train.api import train

    config, _ = full_vocab_cache
    common = dict(max_steps=1, logging_steps=1, save_steps=0, resume="never", learning_rate=1e-3,
                  per_device_batch_size=4)  # fmt: skip
    loaded: list[str] = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        loaded.append(str(path))
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    from_cache = train(config.replace(references="cache", output_dir=str(tmp_path / "c"), **common))
    assert loaded == [config.student_raw]
    local = train(make_config(cache_overrides, tmp_path / "l", **common))
    a, b = from_cache.losses()[0][1], local.losses()[0][1]
    assert a > 1e-3
    assert a == pytest.approx(b, rel=1e-4)


@pytest.mark.slow
def test_build_through_teacher_servers_matches_local(built_cache, tmp_path):
    """`cache.source: servers` (one `deltakd serve` process per role, fp32 replies) stores the
    same targets as local models."""
    from deltakd.references.cache import CacheReferences, build_cache

    config, _ = built_cache
    cache = {**config.cache, "dir": str(tmp_path / "srv"), "source": "servers"}
    srv = config.replace(output_dir=str(tmp_path), cache=cache, servers={"dtype": "fp32"})
    manifest = build_cache(srv, progress=False).manifest
    assert manifest.references["source"] == "servers"
    a, b = CacheReferences(cache["dir"]), CacheReferences(config.cache["dir"])
    for key, batch in enumerate(_batches(config)):
        ta, tb = a.fetch(key, batch).target, b.fetch(key, batch).target
        assert torch.equal(ta.indices, tb.indices)
        torch.testing.assert_close(ta.logprobs, tb.logprobs, atol=1e-4, rtol=0)


def test_build_makes_targets_a_chunk_of_positions_at_a_time(
    cache_overrides, built_cache, tmp_path, monkeypatch
):
    """The build asks its source for hidden states and applies each role's lm_head to at most
    `chunk_size` positions at once (at V = 152k a whole row's float32 logits of every role did
    not fit: docs/USAGE.md), and stores exactly what an unchunked build stores."""
    from safetensors.torch import load_file

    from deltakd.losses.heads import LogitHead
    from deltakd.references.cache.build import build_cache

    seen: list[int] = []
    apply = LogitHead.apply

    def counting(self, hidden, vocab=None):
        seen.append(hidden.shape[:-1].numel())  # positions in this call
        return apply(self, hidden, vocab)

    monkeypatch.setattr(LogitHead, "apply", counting)
    config = make_config(cache_overrides, tmp_path, cache={"value_dtype": "fp32"}, chunk_size=2)
    result = build_cache(config, progress=False)
    assert seen and max(seen) <= 2, seen
    _, whole = built_cache
    assert [s.file for s in result.manifest.shards] == [s.file for s in whole.manifest.shards]
    for info in result.manifest.shards:
        got = load_file(str(result.cache_dir / info.file))
        want = load_file(str(whole.cache_dir / info.file))
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
