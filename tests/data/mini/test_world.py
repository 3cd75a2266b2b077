"""The mini world's tokenizer, chat template, shipped models and build plumbing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltakd.data.mini import MINI_TASKS, load_task, mini_world_dir
from deltakd.data.mini.build import ROLES, SCALES
from deltakd.errors import ConfigError


@pytest.fixture(scope="module")
def world() -> Path:
    return mini_world_dir()


@pytest.fixture(scope="module")
def tokenizer(world: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(world / "tokenizer")


def test_tokenizer_round_trips_task_text(tokenizer) -> None:
    for task in MINI_TASKS:
        for row in load_task(task, "test", limit=20):
            for m in row["messages"]:
                ids = tokenizer(m["content"], add_special_tokens=False)["input_ids"]
                assert tokenizer.decode(ids) == m["content"]
    assert tokenizer.decode(tokenizer("12 × 7 = 84 ÷")["input_ids"]) == "12 × 7 = 84 ÷"
    # digits are one token each, so every number has a single spelling in tokens
    assert tokenizer.tokenize("1234")[-4:] == ["1", "2", "3", "4"]


def test_special_tokens_and_padding(tokenizer) -> None:
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_with_generation_prompt(tokenizer) -> None:
    msgs = [{"role": "user", "content": "How old is Biri?"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHow old is Biri?<|im_end|>\n<|im_start|>assistant\n"
    without = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert without == "<|im_start|>user\nHow old is Biri?<|im_end|>\n"


def test_assistant_mask_covers_exactly_the_assistant_turn(tokenizer) -> None:
    for task in MINI_TASKS:
        for row in load_task(task, "train", limit=10):
            enc = tokenizer.apply_chat_template(
                row["messages"],
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
            )
            ids, mask = enc["input_ids"], enc["assistant_masks"]
            assert len(ids) == len(mask)
            kept = [i for i, m in zip(ids, mask) if m]
            # the reply and its end-of-turn token, nothing of the prompt or the role header
            assert tokenizer.decode(kept) == row["messages"][1]["content"] + "<|im_end|>"
            first = mask.index(1)
            prompt_ids = tokenizer.apply_chat_template(
                row["messages"][:1], tokenize=True, add_generation_prompt=True, return_dict=True
            )["input_ids"]
            assert first == len(prompt_ids)
            assert ids[:first] == prompt_ids


def test_shipped_world_loads_and_agrees(world: Path, tokenizer) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((world / "world.json").read_text())
    assert info["vocab_size"] == len(tokenizer)
    params = info["parameters"]
    assert params["teacher_raw"] == params["teacher_ft"]
    assert params["teacher_raw"] >= 4 * params["student_raw"]  # a real capacity gap
    for role in ROLES:
        model = AutoModelForCausalLM.from_pretrained(world / role)
        assert model.config.model_type == "qwen2"
        assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
        assert sum(p.numel() for p in model.parameters()) == params[role]
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id
        assert len(AutoTokenizer.from_pretrained(world / role)) == len(tokenizer)
    # the finetuned teacher must beat both base models on the tasks, or there is nothing to
    # distill
    scores = info["test_scores"]
    for role in ("teacher_ft", "teacher_ft2"):
        for task in MINI_TASKS:
            ft = scores[role][task]["rouge1"]
            assert ft > scores["teacher_raw"][task]["rouge1"] + 0.2, role
            assert ft > scores["student_raw"][task]["rouge1"] + 0.2, role
    # teacher_ft2 is another SFT run (another data order), not a copy of teacher_ft
    ft, ft2 = (
        (world / r / "model.safetensors").read_bytes() for r in ("teacher_ft", "teacher_ft2")
    )
    assert ft != ft2


def test_shipped_world_is_small(world: Path) -> None:
    total = sum(p.stat().st_size for p in world.rglob("*") if p.is_file())
    assert total < 25 * 2**20


def test_finetuned_teacher_answers_in_the_task_style(world: Path, tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world / "teacher_ft")
    row = load_task("math", "test", limit=1)[0]
    prompt = tokenizer.apply_chat_template(
        row["messages"][:1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=96, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Answer:" in text
    assert out[0, -1].item() in (tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_quick_build_plumbing(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltakd.data.mini import build_world

    out = build_world(tmp_path / "w", seed=3, scale="quick")
    again = build_world(tmp_path / "again", seed=3, scale="quick")
    for name in ("tokenizer/tokenizer.json", *(f"{r}/model.safetensors" for r in ROLES)):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name  # deterministic
    info = json.loads((out / "world.json").read_text())
    assert info["seed"] == 3 and info["scale"] == "quick"
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert len(tok) == info["vocab_size"] <= SCALES["quick"].vocab_size
    for role in ROLES:
        model = AutoModelForCausalLM.from_pretrained(out / role)
        assert model.config.vocab_size == len(tok)
        for task in MINI_TASKS:
            assert 0.0 <= info["test_scores"][role][task]["rouge1"] <= 1.0
    assert "exact_match" in info["test_scores"]["teacher_ft"]["math"]
    assert info["sft_seeds"] == {"teacher_ft": 303, "teacher_ft2": 304}

    # teacher_ft2 alone, into an existing world: the model build_world made, nothing else moved
    from deltakd.data.mini.build import build_role

    before = {p: p.read_bytes() for p in again.rglob("*") if p.is_file()}
    ft2 = again / "teacher_ft2" / "model.safetensors"
    ft2.unlink()
    build_role(again, "teacher_ft2")
    assert ft2.read_bytes() == (out / "teacher_ft2" / "model.safetensors").read_bytes()
    for path, data in before.items():
        if path.name != "world.json":
            assert path.read_bytes() == data, path
    again_info = json.loads((again / "world.json").read_text())
    assert again_info["test_scores"] == info["test_scores"]
    assert again_info["parameters"] == info["parameters"]
    with pytest.raises(ConfigError, match="teacher_ft2"):
        build_role(again, "student_raw")


def test_unknown_scale_is_refused(tmp_path: Path) -> None:
    from deltakd.data.mini import build_world

    with pytest.raises(ConfigError, match="use one of full, quick"):
        build_world(tmp_path, scale="huge")


def test_cli_registers_mini_build() -> None:
    from deltakd.cli import build_parser

    args = build_parser().parse_args(
        ["mini", "build", "--out", "x", "--seed", "2", "--scale", "quick"]
    )
    assert (args.out, args.seed, args.scale, args.threads, args.only) == (
        "x",
        2,
        "quick",
        None,
        None,
    )
    assert (
        build_parser().parse_args(["mini", "build", "--only", "teacher_ft2"]).only == "teacher_ft2"
    )
    assert callable(args.func)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["mini", "build", "--scale", "huge"])
