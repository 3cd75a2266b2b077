"""SeqKD with `generation.backend: vllm`: the teacher's replies come from the vLLM engine, keep
their finish reasons in the cache, and replies cut by max_new_tokens are dropped by default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import deltakd.train.seqkd as seqkd
from deltakd.cli import main
from deltakd.generation import GenerationSettings
from deltakd.generation import generate as hf_generate
from deltakd.train import load_config

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]


def _config(out: Path, **over: Any):
    fields = {
        "method": "seqkd",
        "student_raw": "mini:student_raw",
        "teacher_ft": "mini:teacher_ft",
        "teacher_raw": "mini:teacher_raw",
        "tokenizer": "mini:tokenizer",
        "dataset": "mini:instruct",
        "limit": 8,
        "max_length": 256,
        "max_prompt_length": 128,
        "max_new_tokens": 12,
        "precision": "fp32",
        "device": "cpu",
        "progress": False,
        "output_dir": str(out),
        "generation": {"backend": "vllm"},
    }
    return load_config(None, {**fields, **over})


def test_seqkd_vllm_replies_keep_finish_reasons(vllm_teacher, tmp_path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltakd.data.specs import load_rows
    from deltakd.data.vocab import resolve_model_path

    # The session's engine, lent to SeqKD (which closes the engine it is given).
    monkeypatch.setattr(vllm_teacher, "close", lambda: None)
    monkeypatch.setattr(seqkd, "_vllm_teacher", lambda config: vllm_teacher)
    config = _config(tmp_path / "run")
    tok = AutoTokenizer.from_pretrained(resolve_model_path("mini:tokenizer"))
    rows = load_rows("mini:instruct", "train", limit=8)
    reasons: list[str | None] = []
    replies = seqkd.teacher_generations(rows, config, tok, reasons=reasons)

    records = [
        json.loads(x) for x in (tmp_path / "run" / seqkd.CACHE_NAME).read_text().splitlines()
    ]
    assert {r["finish_reason"] for r in records} == {"stop", "length"}, "cap 12 cuts some"
    assert reasons == [
        {r["key"]: r["finish_reason"] for r in records}[k]
        for k in (
            seqkd.cache_key(t, seqkd.teacher_identity("mini:teacher_ft"), seqkd.generation_settings(config))
            for t in seqkd.generation.render_prompts(tok, [seqkd.split_prompt(r, i) for i, r in enumerate(rows)])
        )
    ]  # fmt: skip
    # greedy fp32: the same replies hf writes
    teacher = AutoModelForCausalLM.from_pretrained(resolve_model_path("mini:teacher_ft"))
    prompts = [seqkd.split_prompt(r, i) for i, r in enumerate(rows)]
    hf = hf_generate(teacher, tok, prompts, GenerationSettings(max_new_tokens=12), progress=False)
    assert replies == [h.text for h in hf]

    # prepare_rows drops the replies that hit the cap, and keeps them when asked to
    method = seqkd.SeqKD()
    kept = method.prepare_rows(list(rows), {"config": config, "tokenizer": tok})
    n_length = reasons.count("length")
    assert len(kept) == len(rows) - n_length and method.dropped_truncated == n_length
    keep_cfg = _config(tmp_path / "run", method_args={"keep_truncated": True})
    assert len(method.prepare_rows(list(rows), {"config": keep_cfg, "tokenizer": tok})) == 8


def test_vllm_cache_keys_differ_from_hf_keys(tmp_path) -> None:
    config = _config(tmp_path)
    vllm_settings = seqkd.generation_settings(config)
    hf_settings = seqkd.generation_settings(_config(tmp_path, generation={}))
    assert vllm_settings.backend == "vllm" and hf_settings.backend == "hf"
    assert seqkd.cache_key("p", "t", vllm_settings) != seqkd.cache_key("p", "t", hf_settings)


@pytest.mark.slow
def test_mini_seqkd_config_runs_on_vllm(tmp_path, capsys) -> None:
    pytest.importorskip("vllm")
    out = tmp_path / "run"
    code = main(["train", str(REPO / "configs/mini/seqkd.yaml"), f"output_dir={out}",
                 "max_steps=2", "limit=16", "per_device_batch_size=2", "max_new_tokens=48",
                 "generation.backend=vllm", "progress=false"])  # fmt: skip
    assert code == 0
    assert "trained 2 steps" in capsys.readouterr().out
    records = [json.loads(x) for x in (out / seqkd.CACHE_NAME).read_text().splitlines()]
    assert len(records) == 16 and all(r["finish_reason"] in ("stop", "length") for r in records)
