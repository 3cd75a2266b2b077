"""The `generation` config section and `deltakd eval --backend vllm` (engine shared)."""

from __future__ import annotations

import pytest

from deltakd.errors import ConfigError
from deltakd.generation import GenerationSettings
from deltakd.generation.vllm import VLLMSettings, backend_from_section


def test_generation_section_defaults_to_hf() -> None:
    assert backend_from_section(None) == ("hf", None)
    assert backend_from_section({"backend": "hf"}) == ("hf", None)


def test_generation_section_builds_engine_settings() -> None:
    backend, s = backend_from_section(
        {"backend": "vllm", "dtype": "float32", "max_model_len": 128, "kv_cache_gib": 0.25}
    )
    assert backend == "vllm"
    assert s == VLLMSettings(dtype="float32", max_model_len=128, kv_cache_gib=0.25)


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"backend": "sglang"}, r"generation.backend' = 'sglang'.*hf, vllm"),
        ({"backend": "vllm", "max_len": 3}, r"unknown config key 'generation.max_len'"),
        ({"max_model_len": 128}, r"backend' is hf; set generation.backend=vllm"),
        ({"backend": "vllm", "max_model_len": "long"}, r"max_model_len' = 'long'"),
        ({"backend": "vllm", "tensor_parallel_size": 1.5}, r"tensor_parallel_size' = 1.5"),
        ({"backend": "vllm", "gpu_memory_utilization": 1.5}, r"must be in \(0, 1\]"),
        ({"backend": "vllm", "dtype": "int8"}, r"dtype' = 'int8' is not allowed.*auto, float32"),
        ({"backend": "vllm", "enforce_eager": "sometimes"}, r"enforce_eager' = 'sometimes'"),
    ],
)
def test_bad_generation_sections_are_config_errors(section: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        backend_from_section(section)


def test_config_and_engine_share_one_list_of_names() -> None:
    # The `generation:` schema is the one place the names live; the backend registry and the
    # engine settings follow it (a key added to one and not the other fails here).
    import dataclasses

    from deltakd.config.sections import ENGINE_KEYS, GENERATION_BACKENDS, GenerationSection
    from deltakd.generation import BACKENDS
    from deltakd.generation.vllm import DTYPES

    assert tuple(BACKENDS) == GENERATION_BACKENDS
    engine_fields = {f.name: f.type for f in dataclasses.fields(VLLMSettings)}
    section_fields = {f.name: f.type for f in dataclasses.fields(GenerationSection)}
    assert set(ENGINE_KEYS) <= set(engine_fields)
    for key in ENGINE_KEYS:  # same value type, None meaning "the engine's default"
        assert section_fields[key].split(" | ")[0] == engine_fields[key].split(" | ")[0], key
    assert GenerationSection.__dataclass_fields__["dtype"].metadata["choices"] == DTYPES


def test_config_file_refuses_engine_keys_with_hf() -> None:
    from deltakd.train import load_config

    with pytest.raises(ConfigError, match=r"generation.kv_cache_gib' sets up the vLLM engine"):
        load_config(None, {"dataset": "mini:instruct", "generation": {"kv_cache_gib": 1.0}})


def test_unknown_backend_setting_is_refused() -> None:
    with pytest.raises(ConfigError, match="expected one of hf, vllm"):
        GenerationSettings(backend="tgi")


@pytest.mark.vllm
def test_evaluate_with_vllm_scores_like_hf(vllm_teacher) -> None:
    from deltakd.data.vocab import resolve_model_path
    from deltakd.eval.evaluate import evaluate, load_eval_rows

    rows = load_eval_rows("mini:math", "test", limit=6)
    path = resolve_model_path("mini:teacher_ft")
    common = {"progress": False, "exact": True}
    v = evaluate(vllm_teacher, path, rows, settings=GenerationSettings(backend="vllm"), **common)
    h = evaluate(path, path, rows, settings=GenerationSettings(), **common)
    assert v.metrics() == h.metrics()
    assert [r["prediction"] for r in v.records] == [r["prediction"] for r in h.records]
    assert v.meta["generation"]["backend"] == "vllm"
