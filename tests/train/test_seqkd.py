"""SeqKD: SFT on teacher_ft's generations, generated once and reused from the JSONL cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import deltakd.generation as generation
from deltakd.cli import main
from deltakd.errors import CacheError, ConfigError, DataError
from deltakd.train import load_config, train
from deltakd.train.seqkd import (
    CACHE_NAME,
    _drop_torn_tail,
    cache_key,
    generation_settings,
    read_cache,
)

REPO = Path(__file__).resolve().parents[2]


#: the real `generate`, kept before any test patches it
_GENERATE = generation.generate


@pytest.fixture
def generate_calls(monkeypatch) -> list[int]:
    """Counts the prompts passed to `deltakd.generation.generate` (still generating)."""
    calls: list[int] = []

    def counting(model, tokenizer, prompts, settings=None, **kw):
        calls.append(len(prompts))
        return _GENERATE(model, tokenizer, prompts, settings, **kw)

    monkeypatch.setattr(generation, "generate", counting)
    return calls


def _config(base: dict, out: Path, **over):
    # The tiny teacher rarely stops within 10 tokens: keep its capped replies unless a test says.
    over["method_args"] = {"keep_truncated": True, **over.get("method_args", {})}
    return load_config(None, {**base, "output_dir": str(out), "method": "seqkd",
                              "max_new_tokens": 10, **over})  # fmt: skip


def test_seqkd_trains_on_cached_teacher_generations(base_overrides, tiny_world, tmp_path,
                                                    generate_calls):  # fmt: skip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    common = dict(limit=4, shuffle=False, resume="auto", save_steps=5)
    first = train(_config(base_overrides, out, max_steps=5, **common))
    # 4 distinct prompts, generated once.
    assert generate_calls == [4]
    losses = [v for _, v in first.losses()]
    assert losses[-1] < 0.9 * losses[0], losses
    records = [json.loads(x) for x in (out / CACHE_NAME).read_text().splitlines()]
    assert len(records) == 4
    assert {r["finish_reason"] for r in records} <= {"stop", "length"}  # hf reports it too
    # The cached replies are what teacher_ft writes greedily for those prompts.
    tok = AutoTokenizer.from_pretrained(tiny_world["tokenizer"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_world["teacher_ft"])
    from deltakd.data.specs import load_rows

    rows = load_rows(base_overrides["dataset"], None, limit=4)
    prompts = [r["messages"][:-1] for r in rows]
    settings = generation.GenerationSettings(max_new_tokens=10)
    direct = [g.text for g in _GENERATE(teacher, tok, prompts, settings, progress=False)]
    by_prompt = {r["prompt"]: r["response"] for r in records}
    texts = generation.render_prompts(tok, prompts)
    assert [by_prompt[t] for t in texts] == direct
    assert any(direct)  # the tiny teacher says something, so the SFT target is its text

    # Resume (more steps, same output_dir): the cache answers everything, nothing is generated.
    generate_calls.clear()
    second = train(_config(base_overrides, out, max_steps=6, **common))
    assert second.resumed_from is not None
    assert generate_calls == []
    # A different decoding setting is a different key: only then does the teacher run again.
    third = _config(base_overrides, tmp_path / "other", max_steps=1, limit=4,
                    method_args={"cache_file": str(out / CACHE_NAME), "batch_size": 2})  # fmt: skip
    train(third)
    assert generate_calls == []  # batch_size does not change greedy outputs: same keys
    train(third.replace(output_dir=str(tmp_path / "o2"), max_new_tokens=11))
    assert generate_calls == [4]


def test_cache_keys_follow_prompt_teacher_and_settings(base_overrides, tmp_path):
    cfg = _config(base_overrides, tmp_path)
    s = generation_settings(cfg)
    k = cache_key("p", "teacher@1", s)
    assert k == cache_key("p", "teacher@1", s)
    assert k != cache_key("q", "teacher@1", s)
    assert k != cache_key("p", "teacher@2", s)
    sampled = generation_settings(cfg.replace(method_args={"do_sample": True}))
    assert k != cache_key("p", "teacher@1", sampled)
    assert cache_key("p", "t", sampled) != cache_key(
        "p", "t", generation_settings(cfg.replace(method_args={"do_sample": True, "seed": 5}))
    )


def test_torn_last_line_is_ignored_and_a_corrupt_line_is_refused(tmp_path):
    path = tmp_path / CACHE_NAME
    path.write_text('{"key": "a", "response": "x"}\n{"key": "b", "resp')
    assert read_cache(path) == {"a": "x"}
    _drop_torn_tail(path)  # what a generation run does before appending
    assert path.read_text() == '{"key": "a", "response": "x"}\n'
    path.write_text('{"key": "a", "response": "x"}\nnot json\n{"key": "b", "response": "y"}\n')
    with pytest.raises(CacheError, match=r"line 2 .*delete the file"):
        read_cache(path)


def test_bad_seqkd_settings_are_refused(base_overrides, tmp_path):
    with pytest.raises(ConfigError, match=r"method_args.beam.*allowed keys are do_sample"):
        _config(base_overrides, tmp_path, method_args={"beam": 4})
    with pytest.raises(ConfigError, match="temperature"):
        _config(base_overrides, tmp_path, method_args={"do_sample": True, "temperature": 0})
    with pytest.raises(ConfigError, match=r"'teacher_ft' = None .*seqkd"):
        _config(base_overrides, tmp_path, teacher_ft=None)


def test_mini_seqkd_config_runs(base_overrides, tmp_path, capsys):
    out = tmp_path / "run"
    keys = ("student_raw", "teacher_ft", "teacher_raw", "tokenizer", "dataset", "max_length",
            "max_prompt_length", "device", "progress")  # fmt: skip
    world = [f"{k}={base_overrides[k]}" for k in keys]
    code = main(["train", str(REPO / "configs/mini/seqkd.yaml"), f"output_dir={out}",
                 "max_steps=2", *world, "per_device_batch_size=2", "max_new_tokens=8",
                 "method_args.keep_truncated=true"])  # fmt: skip
    assert code == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert (out / CACHE_NAME).is_file()
    assert (out / "final" / "model.safetensors").is_file()


def test_replies_that_hit_max_new_tokens_are_dropped_by_default(base_overrides, tmp_path):
    from deltakd.train.seqkd import SeqKD, teacher_generations

    cfg = _config(base_overrides, tmp_path / "run", limit=4, max_new_tokens=3,
                  method_args={"keep_truncated": False})  # fmt: skip
    from deltakd.data.specs import load_rows
    from deltakd.data.vocab import load_tokenizer

    rows = load_rows(base_overrides["dataset"], None, limit=4)
    tok = load_tokenizer(cfg.tokenizer)
    reasons: list[str | None] = []
    teacher_generations(rows, cfg, tok, reasons=reasons)
    assert reasons == ["length"] * 4  # three tokens end no reply of the tiny teacher
    # Unfinished answers would teach the student to stop mid-answer: none is kept.
    with pytest.raises(
        DataError, match=r"every teacher reply hit max_new_tokens=3.*keep_truncated"
    ):
        SeqKD().prepare_rows(list(rows), {"config": cfg, "tokenizer": tok})
    kept = SeqKD().prepare_rows(
        list(rows),
        {"config": cfg.replace(method_args={"keep_truncated": True}), "tokenizer": tok},
    )
    assert len(kept) == 4


def test_ranks_generate_disjoint_shares_into_their_own_files(
    base_overrides, tmp_path, generate_calls
):
    from deltakd.data.specs import load_rows
    from deltakd.data.vocab import load_tokenizer
    from deltakd.train.seqkd import read_caches, teacher_generations

    cfg = _config(base_overrides, tmp_path / "run", limit=5)
    rows = load_rows(base_overrides["dataset"], None, limit=5)
    tok = load_tokenizer(cfg.tokenizer)
    path = tmp_path / "run" / CACHE_NAME
    # Rank 1 of 2 first, as if rank 0 were slower: it answers only its share and does not wait.
    distinct = len({json.dumps(r["messages"][:-1]) for r in rows})  # 4: two rows share one
    part = teacher_generations(rows, cfg, tok, rank=1, world=2, wait=False)
    assert generate_calls == [distinct // 2]  # the 2nd, 4th, ... distinct prompts
    assert not (tmp_path / "run" / CACHE_NAME).exists()
    assert sum(r != "" for r in part) < len(rows)  # rank 0's share is still missing
    assert (tmp_path / "run" / "seqkd_generations.rank1.jsonl").is_file()
    # Rank 0 generates the other three, then finds rank 1's answers in its file.
    full = teacher_generations(rows, cfg, tok, rank=0, world=2)
    assert generate_calls == [distinct // 2, distinct - distinct // 2]
    assert len(read_caches(path)) == distinct and len(full) == 5
    # One process later reads every rank's file and generates nothing.
    generate_calls.clear()
    assert teacher_generations(rows, cfg, tok) == full
    assert generate_calls == []


def test_a_rank_waits_for_the_others_answers(base_overrides, tmp_path, monkeypatch):
    import threading

    from deltakd.data.specs import load_rows
    from deltakd.data.vocab import load_tokenizer
    from deltakd.train import seqkd

    cfg = _config(base_overrides, tmp_path / "run", limit=4)
    rows = load_rows(base_overrides["dataset"], None, limit=4)
    tok = load_tokenizer(cfg.tokenizer)
    done = threading.Event()
    result: list[list[str]] = []

    def rank0() -> None:
        result.append(seqkd.teacher_generations(rows, cfg, tok, rank=0, world=2, poll=0.05))
        done.set()

    t = threading.Thread(target=rank0)
    t.start()
    # Rank 0 answers its two prompts and then waits: rank 1's share is still missing.
    assert not done.wait(3.0)
    seqkd.teacher_generations(rows, cfg, tok, rank=1, world=2, wait=False)
    assert done.wait(60.0)
    t.join()
    assert len(result[0]) == 4 and len(seqkd.read_caches(tmp_path / "run" / CACHE_NAME)) == 4
