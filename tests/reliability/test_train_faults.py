"""Faults met during a training run on the tiny world: reported with cause and fix, or counted.

Complements tests/train/test_trainer.py (NaN reference logits stop/skip, NaN gradients
stop/skip, crash during a save) with: +inf in another role's logits, gradient-norm spikes,
rows longer than max_length, a missing teacher path, and a corrupted cache shard.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from deltakd.errors import CacheError, ConfigError, DataError, NonFiniteError
from deltakd.references.base import ReferenceBatch, ReferenceSource
from tests.conftest import tiny_run_fields

ROWS = [
    ("what colour is the fox?", "the fox is red."),
    ("what does alice have?", "alice has three apples."),
    ("seven plus six?", "seven plus six is thirteen."),
    ("sort: pear, apple, fig.", "the sorted list is apple, fig, pear."),
]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared CPU
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    data = tmp_path_factory.mktemp("rel_data") / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in ROWS))
    return {
        **tiny_run_fields(tiny_world, data),
        "method": "delta_kd",
        "shuffle": False,
        "max_steps": 2,
    }


def _config(base: dict, out: Path, **over: Any):
    from deltakd.train import load_config

    return load_config(None, {**base, "output_dir": str(out), **over})


class _Poison(ReferenceSource):
    """Sets one role's logits to `value` at one position of one micro-batch."""

    def __init__(self, inner: ReferenceSource, role: str, key: int, value: float) -> None:
        self.inner, self.role, self.key, self.value = inner, role, key, value
        self.roles = inner.roles

    def fetch(self, key: int, batch: Mapping[str, torch.Tensor]) -> ReferenceBatch:
        out = self.inner.fetch(key, batch)
        if key == self.key:
            x = out.logits[self.role].clone()
            # Row 1 of the batch, at its first counted position (logit t scores token t+1).
            t = int(batch["assistant_mask"][1, 1:].nonzero()[0])
            x[1, t, 7] = self.value
            out.logits[self.role] = x
        return out


def _local(tiny_world: dict) -> ReferenceSource:
    from deltakd.references.local import LocalReferences

    return LocalReferences({r: str(tiny_world[r]) for r in ("teacher_ft", "teacher_raw",
                                                            "student_raw")})  # fmt: skip


def test_inf_logits_stop_naming_role_batch_and_rows(base, tiny_world, tmp_path):
    from deltakd.train import train

    cfg = _config(base, tmp_path / "r", per_device_batch_size=2)
    with pytest.raises(NonFiniteError) as err:
        train(cfg, references=_Poison(_local(tiny_world), "student_raw", 1, float("inf")))
    msg = str(err.value)
    assert "the student_raw logits contain NaN/inf at 1 counted positions" in msg
    assert "dataset rows [3]" in msg and "micro-batch 1 at optimizer step 1" in msg
    assert "reference_dtype=fp32" in msg and "nonfinite=skip" in msg  # the fixes
    assert not (tmp_path / "r" / "final").exists()


class _GradTimes:
    """Callback: multiplies the lm_head gradient by `factor` during optimizer step `step`."""

    def __init__(self, step: int, factor: float) -> None:
        self.step, self.factor = step, factor

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, model=None, **kw):
        def hook(grad):
            return grad * self.factor if state.global_step == self.step else grad

        model.lm_head.weight.register_hook(hook)


def test_gradient_norm_spike_is_logged_counted_and_training_goes_on(base, tmp_path, caplog):
    from deltakd.train import train

    cfg = _config(base, tmp_path / "r", method="sft", max_steps=8, grad_norm_spike=10.0,
                  report_to="csv")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="deltakd.train"):
        result = train(cfg, callbacks=[_GradTimes(6, 1e4)])
    assert result.global_step == 8 and result.metrics["grad_norm_spikes"] == 1
    assert any("gradient-norm spike at step 6" in r.getMessage() for r in caplog.records)
    norms = [h["grad_norm"] for h in result.history if "grad_norm" in h]
    assert norms[6] > 100 * sorted(norms[:6])[3]  # the logged norm is the spike itself
    rows = (result.output_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].endswith("grad_norm_spikes") and rows[-1].endswith(",1")
    from safetensors.torch import load_file

    weights = load_file(str(result.final_dir / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())  # clipping kept it sane


def test_rows_longer_than_max_length_are_counted_and_reported(base, tiny_world, tmp_path,
                                                              caplog):  # fmt: skip
    from deltakd.data.tokenize import encode_chat
    from deltakd.data.vocab import load_tokenizer
    from deltakd.train import train

    tok = load_tokenizer(str(tiny_world["tokenizer"]))
    lengths = []
    for p, r in ROWS:
        chat = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        lengths.append(len(encode_chat(tok, chat)[0]))
    limit = sorted(lengths)[1]  # the two shortest rows fit, the other two do not
    longer = sum(n > limit for n in lengths)
    assert longer >= 1
    over = dict(max_length=limit, max_prompt_length=limit - 1, max_steps=1)
    with caplog.at_level(logging.WARNING, logger="deltakd.train"):
        result = train(_config(base, tmp_path / "drop", truncation="drop", **over))
    assert result.data_stats["dropped_too_long"] == longer
    assert result.data_stats["kept"] == len(ROWS) - longer
    saved = json.loads((tmp_path / "drop" / "data_stats.json").read_text())
    assert saved["dropped_rows"] == [i for i, n in enumerate(lengths) if n > limit]
    assert any(f"0 rows truncated, {longer} dropped" in r.getMessage() for r in caplog.records)

    first = next(i for i, n in enumerate(lengths) if n > limit)
    with pytest.raises(DataError) as err:
        train(_config(base, tmp_path / "error", truncation="error", **over))
    msg = str(err.value)
    assert f"row {first + 1} has {lengths[first]} tokens, more than max_length={limit}" in msg
    assert "raise max_length or set truncation=truncate or truncation=drop" in msg


def test_missing_teacher_path_is_refused_before_training(base, tmp_path):
    from deltakd.train import train

    missing = str(tmp_path / "models" / "teacher_raw")
    with pytest.raises(ConfigError) as err:
        train(_config(base, tmp_path / "r", teacher_raw=missing))
    assert f"model path {missing!r} does not exist" in str(err.value)
    assert "check the path in the config" in str(err.value)
    assert not (tmp_path / "r").exists()  # nothing written for a run that cannot start


def test_corrupted_cache_shard_names_file_and_rebuild(base, tmp_path):
    from deltakd.references.cache import CacheReferences
    from deltakd.references.cache.build import build_cache

    cache_dir = tmp_path / "cache"
    cfg = _config(base, tmp_path / "r", cache={"dir": str(cache_dir), "k": 4})
    build_cache(cfg, progress=False)
    shard = sorted(cache_dir.glob("shard-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[8:40] = b"\x00" * 32  # a damaged safetensors header
    shard.write_bytes(bytes(raw))
    with pytest.raises(CacheError) as err:
        CacheReferences(cache_dir)
    msg = str(err.value)
    assert f"cache shard {shard.name} in {cache_dir} is corrupt" in msg
    assert "Rebuild the cache with `deltakd cache build CONFIG` (completed shards are kept)" in msg
