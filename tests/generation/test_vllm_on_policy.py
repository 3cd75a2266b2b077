"""On-policy KD with `generation.backend: vllm`: the student's samples come from a colocated
vLLM engine whose weights are synced from the student once per optimizer step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from deltakd.errors import ConfigError
from deltakd.train import load_config, train
from tests.generation.conftest import make_vllm_student

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32-wide-head student over the mini tokenizer (the mini student's 16-wide heads are
    not supported by vLLM's CPU kernels)."""
    from transformers import AutoTokenizer

    from deltakd.data.vocab import resolve_model_path

    out = tmp_path_factory.mktemp("vllm_student")
    tok = AutoTokenizer.from_pretrained(resolve_model_path("mini:tokenizer"))
    make_vllm_student(len(tok), seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def on_policy_config(student: Path, out: Path, **over: Any):
    fields = {
        "method": "kd",
        "on_policy_ratio": 1.0,
        "student_raw": str(student),
        "teacher_ft": "mini:teacher_ft",
        "teacher_raw": "mini:teacher_raw",
        "tokenizer": "mini:tokenizer",
        "dataset": "mini:instruct",
        "limit": 16,
        "max_length": 128,
        "max_prompt_length": 64,
        "max_new_tokens": 24,
        "per_device_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-3,
        "max_steps": 3,
        "precision": "fp32",
        "device": "cpu",
        "progress": False,
        "logging_steps": 1,
        "save_steps": 0,
        "resume": "never",
        "output_dir": str(out),
        "generation": {"backend": "vllm", "kv_cache_gib": 0.0625},
    }
    return load_config(None, {**fields, **over})


def test_on_policy_vllm_syncs_once_per_step_and_is_seeded(vllm_student_dir, tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    from deltakd.generation import vllm as vllm_backend

    syncs: list[int] = []
    samples: list[list[list[int]]] = []
    real_load, real_gen = vllm_backend.VLLMEngine.load_weights, vllm_backend.VLLMEngine.generate_ids

    def counting_load(self, weights):
        syncs.append(len(weights))
        return real_load(self, weights)

    def recording_gen(self, prompts, **kw):
        out = real_gen(self, prompts, **kw)
        samples.append([ids for ids, _ in out])
        return out

    engines: list[Any] = []
    real_from_model = vllm_backend.VLLMEngine.from_model.__func__

    def keeping_from_model(cls, model, settings=None):
        engines.append(real_from_model(cls, model, settings))
        return engines[-1]

    monkeypatch.setattr(vllm_backend.VLLMEngine, "load_weights", counting_load)
    monkeypatch.setattr(vllm_backend.VLLMEngine, "generate_ids", recording_gen)
    monkeypatch.setattr(vllm_backend.VLLMEngine, "from_model", classmethod(keeping_from_model))
    try:
        _check_runs(vllm_student_dir, tmp_path, syncs, samples)
    finally:
        for engine in engines:  # the trainer leaves its engine to the end of the process
            engine.close()
    assert len(engines) == 2


def _check_runs(student: Path, tmp_path: Path, syncs: list, samples: list) -> None:
    first = train(on_policy_config(student, tmp_path / "a"))
    # 3 steps x 2 micro-batches sampled; weights loaded when the engine is built (step 0) and
    # synced before steps 1 and 2, not per micro-batch.
    assert len(samples) == 6
    assert len(syncs) == 3
    run_a = list(samples)
    samples.clear()
    second = train(on_policy_config(student, tmp_path / "b"))
    assert samples == run_a, "a fixed seed gives the same on-policy samples run to run"
    assert [v for _, v in first.losses()] == [v for _, v in second.losses()]
    assert all(len(s) > 0 for batch in run_a for s in batch)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks vLLM's CPU attention kernels")
def test_student_head_size_vllm_lacks_is_refused_when_the_config_is_read(tmp_path) -> None:
    # The mini student's 16-wide heads: refused at validation (before data and models load),
    # naming the student, the sizes the installed vLLM supports and the way out.
    pytest.importorskip("vllm")
    with pytest.raises(ConfigError) as info:
        on_policy_config(Path("mini:student_raw"), tmp_path)
    text = str(info.value)
    assert "student_raw='mini:student_raw'" in text
    assert "head size (head_dim) is 16" in text
    assert "32, 64" in text and "generation.backend=hf" in text


def test_hf_on_policy_takes_any_head_size(tmp_path) -> None:
    config = on_policy_config(Path("mini:student_raw"), tmp_path, generation={})
    assert config.student_raw == "mini:student_raw"
