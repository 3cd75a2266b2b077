"""Batched generation (`deltakd.generation`, backend hf): left padding must not change greedy
outputs; stopping and finish reasons; settings; backends by name."""

from __future__ import annotations

from typing import Any

import pytest

import deltakd.generation as gen_mod
from deltakd.errors import ConfigError, DataError
from deltakd.generation import (
    Generation,
    GenerationSettings,
    render_prompts,
    stop_token_ids,
)
from deltakd.generation import generate as generate_all


def generate(*args: Any, **kw: Any) -> list[str]:
    """The replies' texts (most tests compare text)."""
    return [g.text for g in generate_all(*args, **kw)]


PROMPTS: list[Any] = [
    [{"role": "user", "content": "what colour is the fox?"}],
    "hi",
    [
        {"role": "system", "content": "answer briefly"},
        {"role": "user", "content": "alice has three apples and bob has five apples"},
    ],
    "sort the list: pear, apple, fig.",
    [{"role": "user", "content": "seven plus six"}],
]


def test_left_padded_batches_match_batch_size_one(loaded_chat_model) -> None:
    model, tok = loaded_chat_model
    one = generate(
        model, tok, PROMPTS, GenerationSettings(max_new_tokens=8, batch_size=1), progress=False
    )
    many = generate(
        model, tok, PROMPTS, GenerationSettings(max_new_tokens=8, batch_size=5), progress=False
    )
    two = generate(
        model, tok, PROMPTS, GenerationSettings(max_new_tokens=8, batch_size=2), progress=False
    )
    assert one == many == two
    assert len(one) == len(PROMPTS)
    assert any(one), "a random model should produce some non-empty text"
    # prompts of different lengths give different replies (rows are not mixed up)
    assert len(set(one)) > 1


def test_prompt_uses_generation_prompt(loaded_chat_model) -> None:
    _, tok = loaded_chat_model
    (text,) = render_prompts(tok, ["hi"])
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nhi<|im_end|>" in text


def test_stops_at_end_of_turn(loaded_chat_model, monkeypatch) -> None:
    model, tok = loaded_chat_model
    ids = tok(render_prompts(tok, ["hi"])[0], return_tensors="pt", add_special_tokens=False)
    out = model.generate(
        **ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    # Pretend the 3rd generated token ends the turn: the reply must stop just before it.
    stop = tok.convert_ids_to_tokens(new[2])
    if new[2] in new[:2]:
        pytest.skip("the random model repeats its stop candidate; cannot test the cut")
    monkeypatch.setattr(gen_mod, "END_OF_TURN_TOKENS", ("<|im_end|>", stop))
    assert new[2] in stop_token_ids(tok)
    (reply,) = generate_all(
        model, tok, ["hi"], GenerationSettings(max_new_tokens=6), progress=False
    )
    assert reply.text == tok.decode(new[:2], skip_special_tokens=True).strip()
    assert reply.token_ids == new[:2] and reply.finish_reason == "stop"


def test_stop_tokens_include_im_end(loaded_chat_model) -> None:
    _, tok = loaded_chat_model
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok)


def test_sampling_is_seeded(loaded_chat_model) -> None:
    model, tok = loaded_chat_model
    s = GenerationSettings(max_new_tokens=6, batch_size=5, do_sample=True, temperature=1.5, seed=3)
    a = generate(model, tok, PROMPTS, s, progress=False)
    b = generate(model, tok, PROMPTS, s, progress=False)
    assert a == b


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ConfigError, match="temperature"):
        GenerationSettings(do_sample=True, temperature=0.0)


def test_tokenizer_without_chat_template(loaded_chat_model) -> None:
    import copy

    _, tok = loaded_chat_model
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        render_prompts(bare, ["hi"])


def test_generations_carry_token_ids_and_length_finish(loaded_chat_model, monkeypatch) -> None:
    model, tok = loaded_chat_model
    import deltakd.generation.hf as hf

    monkeypatch.setattr(hf, "stop_token_ids", lambda tok: [])  # every reply runs out
    gens = generate_all(model, tok, PROMPTS[:2], GenerationSettings(max_new_tokens=5),
                        progress=False)  # fmt: skip
    assert all(isinstance(g, Generation) for g in gens)
    assert [g.finish_reason for g in gens] == ["length", "length"]
    assert [len(g.token_ids) for g in gens] == [5, 5]
    assert gens[0].text == tok.decode(gens[0].token_ids, skip_special_tokens=True).strip()


def test_backends_are_chosen_by_name(loaded_chat_model, monkeypatch) -> None:
    model, tok = loaded_chat_model
    with pytest.raises(ConfigError, match="backend 'tpu' is not allowed: expected one of hf"):
        GenerationSettings(backend="tpu")
    seen: list[str] = []

    def fake(model, tokenizer, prompts, settings, *, progress):
        seen.append(settings.backend)
        return [Generation("x", [1], "stop") for _ in prompts]

    import sys
    import types

    module = types.ModuleType("fake_backend")
    module.generate_batch = fake  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_backend", module)
    monkeypatch.setitem(gen_mod.BACKENDS, "fake", "fake_backend:generate_batch")
    out = generate_all(model, tok, ["a", "b"], GenerationSettings(backend="fake"))
    assert [g.text for g in out] == ["x", "x"] and seen == ["fake"]
