"""On-policy KD / Delta-KD: the student's samples, scored by the references, seeded and exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from deltakd.cli import main
from deltakd.errors import ConfigError
from deltakd.train import load_config, train
from deltakd.train import methods as methods_mod
from deltakd.train.on_policy import (
    OnPolicyDeltaKD,
    OnPolicyKD,
    batch_generator,
    prompts_from_batch,
    sample_responses,
)
from deltakd.train.trainer import DistillTrainer

REPO = Path(__file__).resolve().parents[2]


def _run(base: dict, out: Path, **over: Any):
    return train(load_config(None, {**base, "output_dir": str(out), "max_new_tokens": 12, **over}))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def _models(tiny_world: dict, *roles: str) -> list[torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    return [AutoModelForCausalLM.from_pretrained(tiny_world[r]).eval() for r in roles]


def _tokenizer(tiny_world: dict):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_world["tokenizer"])


def _record_batches(monkeypatch, cls: type) -> list[dict[str, Any]]:
    """Capture what `prepare_batch` hands to the trainer (and the step it was drawn at)."""
    seen: list[dict[str, Any]] = []
    original = cls.prepare_batch

    def spy(self, trainer, model, inputs):
        before = {k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)}
        out = original(self, trainer, model, inputs)
        seen.append({"step": trainer.state.global_step, "before": before, "after": dict(out)})
        return out

    monkeypatch.setattr(cls, "prepare_batch", spy)
    return seen


def test_greedy_sampler_matches_hf_generate(tiny_world):
    # The KV-cached loop with left padding must decode exactly what `generate` decodes.
    (student,) = _models(tiny_world, "student_raw")
    tok = _tokenizer(tiny_world)
    prompts = [tok("what colour is the fox?")["input_ids"], tok("seven")["input_ids"]]
    got = sample_responses(student, prompts, max_new_tokens=10, stop_ids=[tok.eos_token_id],
                           pad_id=tok.pad_token_id, vocab_size=len(tok), greedy=True)  # fmt: skip
    for p, g in zip(prompts, got, strict=True):
        ref = student.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)  # fmt: skip
        expected = ref[0, len(p) :].tolist()
        if tok.eos_token_id in expected:
            expected = expected[: expected.index(tok.eos_token_id) + 1]
        assert g == expected


def test_teacher_mix_one_samples_the_teacher_and_seed_fixes_samples(tiny_world):
    student, teacher = _models(tiny_world, "student_raw", "teacher_ft")
    tok = _tokenizer(tiny_world)
    prompts = [tok("the red fox")["input_ids"], tok("alice has")["input_ids"]] * 2
    kw = dict(max_new_tokens=8, stop_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
              vocab_size=len(tok))  # fmt: skip

    def gen():
        return batch_generator(0, 3, 1, 0, "t", torch.device("cpu"))

    mixed = sample_responses(
        student, prompts, teacher=teacher, teacher_mix=1.0, generator=gen(), **kw
    )
    alone = sample_responses(teacher, prompts, generator=gen(), **kw)
    assert mixed == alone
    assert sample_responses(student, prompts, generator=gen(), **kw) == sample_responses(
        student, prompts, generator=gen(), **kw
    )
    other = batch_generator(0, 4, 1, 0, "t", torch.device("cpu"))
    assert sample_responses(student, prompts, generator=other, **kw) != sample_responses(
        student, prompts, generator=gen(), **kw
    )


def test_prompts_stop_before_the_last_assistant_turn_and_keep_the_tail():
    inputs = {
        "input_ids": torch.tensor([[1, 2, 3, 4, 5, 6, 0], [7, 8, 9, 10, 11, 12, 13]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1] * 7]),
        "assistant_mask": torch.tensor([[0, 0, 1, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1, 1]]).bool(),
    }
    assert prompts_from_batch(inputs, 10) == [[1, 2, 3, 4, 5], [7, 8, 9, 10]]
    assert prompts_from_batch(inputs, 3) == [[3, 4, 5], [8, 9, 10]]


def test_ratio_one_trains_on_the_students_own_samples(
    base_overrides, tiny_world, tmp_path, monkeypatch
):
    seen = _record_batches(monkeypatch, OnPolicyKD)
    common = dict(method="kd", on_policy_ratio=1.0, max_steps=2, limit=4, shuffle=False,
                  learning_rate=1e-3)  # fmt: skip
    _run(base_overrides, tmp_path / "a", **common)
    first = [dict(s) for s in seen]
    assert [s["step"] for s in first] == [0, 1]  # drawn with the current weights, one per step
    tok = _tokenizer(tiny_world)
    (student,) = _models(tiny_world, "student_raw")
    for s in first:
        before, after = s["before"], s["after"]
        prompts = prompts_from_batch(before, base_overrides["max_prompt_length"])
        ids, mask, att = after["input_ids"], after["assistant_mask"], after["attention_mask"]
        for i, p in enumerate(prompts):
            n = int(att[i].sum())
            assert ids[i, : len(p)].tolist() == p  # the row's own prompt
            assert not mask[i, : len(p)].any() and mask[i, len(p) : n].all()  # generated only
            assert not mask[i, n:].any() and not att[i, n:].any()
            resp = ids[i, len(p) : n].tolist()
            assert tok.eos_token_id not in resp[:-1]  # cut right after the stop token
            assert resp[-1] == tok.eos_token_id or len(resp) == 12
    # The first step's samples are the initial student's, drawn with the step's own generator.
    prompts = prompts_from_batch(first[0]["before"], base_overrides["max_prompt_length"])
    expected = sample_responses(
        student, prompts, max_new_tokens=12, stop_ids=[tok.eos_token_id],
        pad_id=tok.pad_token_id, vocab_size=len(tok),
        generator=batch_generator(0, 0, 0, 0, "gkd", torch.device("cpu")),
    )  # fmt: skip
    got = first[0]["after"]
    for i, p in enumerate(prompts):
        n = int(got["attention_mask"][i].sum())
        assert got["input_ids"][i, len(p) : n].tolist() == expected[i]
    # A fixed seed gives identical samples.
    seen.clear()
    _run(base_overrides, tmp_path / "b", **common)
    for a, b in zip(first, seen, strict=True):
        assert torch.equal(a["after"]["input_ids"], b["after"]["input_ids"])


def _fkl_on_dataset(base: dict, student_dir: Path, tiny_world: dict) -> float:
    """Mean forward KL(teacher_ft ‖ student) on the dataset's response tokens (fixed batch)."""
    from transformers import AutoModelForCausalLM

    from deltakd.data.specs import load_rows
    from deltakd.data.tokenize import ChatCollator, encode_rows
    from deltakd.losses import kd_loss

    tok = _tokenizer(tiny_world)
    rows = load_rows(base["dataset"], None, limit=4)
    enc, _, _ = encode_rows(tok, rows, max_length=64)
    batch = ChatCollator(pad_token_id=tok.pad_token_id)(
        [{"input_ids": e.input_ids, "assistant_mask": e.assistant_mask} for e in enc]
    )
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    (teacher,) = _models(tiny_world, "teacher_ft")
    with torch.no_grad():
        zs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        zt = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["assistant_mask"][:, 1:] & batch["attention_mask"][:, 1:].bool()
    return float(kd_loss(zs[:, :-1], zt[:, :-1], mask=mask))


def test_on_policy_delta_kd_learns(base_overrides, tiny_world, tmp_path):
    # α = 0 makes the Delta-KD target the teacher, so the fixed-batch KL to it must fall.
    result = _run(base_overrides, tmp_path / "r", method="delta_kd", alpha=0.0,
                  on_policy_ratio=1.0, max_steps=6, limit=4)  # fmt: skip
    before = _fkl_on_dataset(base_overrides, tiny_world["student_raw"], tiny_world)
    after = _fkl_on_dataset(base_overrides, result.final_dir, tiny_world)
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize(
    ("method", "cls"), [("kd", methods_mod.KD), ("delta_kd", methods_mod.DeltaKD)]
)
def test_ratio_zero_equals_the_off_policy_run(base_overrides, tmp_path, monkeypatch, method, cls):
    common = dict(method=method, max_steps=2, learning_rate=1e-3)
    on = _run(base_overrides, tmp_path / "on", on_policy_ratio=0.0, **common)
    methods_mod.method_names()  # load the plug-ins, then put the plain class back
    monkeypatch.setitem(methods_mod._REGISTRY, method, cls)
    off = _run(base_overrides, tmp_path / "off", **common)
    assert on.losses() == off.losses()
    wa, wb = _weights(on.output_dir), _weights(off.output_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_equals_uninterrupted(base_overrides, tmp_path, monkeypatch):
    common = dict(method="delta_kd", on_policy_ratio=0.5, max_steps=4, save_steps=2,
                  per_device_batch_size=2, gradient_accumulation_steps=2, learning_rate=3e-3,
                  resume="auto")  # fmt: skip
    seen = _record_batches(monkeypatch, OnPolicyDeltaKD)
    full = _run(base_overrides, tmp_path / "full", **common)
    n_on = sum("on_policy" in s["after"] for s in seen)
    assert 0 < n_on < len(seen) == 8  # the seeded coin picks some micro-batches, not all

    original = DistillTrainer._save_rng_state

    def crash(self, output_dir):
        if self.state.global_step == 4:
            raise KeyboardInterrupt("simulated kill during save")
        return original(self, output_dir)

    monkeypatch.setattr(DistillTrainer, "_save_rng_state", crash)
    with pytest.raises(KeyboardInterrupt):
        _run(base_overrides, tmp_path / "crash", **common)
    monkeypatch.setattr(DistillTrainer, "_save_rng_state", original)
    resumed = _run(base_overrides, tmp_path / "crash", **common)
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("checkpoint-2")
    assert resumed.losses() == full.losses()
    wa, wb = _weights(full.output_dir), _weights(resumed.output_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_on_policy_settings_are_refused(base_overrides, tmp_path):
    base = {**base_overrides, "output_dir": str(tmp_path)}
    with pytest.raises(
        ConfigError, match=r"method_args.sample_temp.*allowed keys are sample_temperature"
    ):
        load_config(None, {**base, "method": "kd", "on_policy_ratio": 0.5,
                           "method_args": {"sample_temp": 1.0}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"sample_temperature.*> 0"):
        load_config(None, {**base, "method": "kd", "on_policy_ratio": 0.5,
                           "method_args": {"sample_temperature": 0}})  # fmt: skip
    with pytest.raises(ConfigError, match="references: cache: the cache holds targets"):
        load_config(None, {**base, "method": "delta_kd", "on_policy_ratio": 0.5,
                           "references": "cache"})  # fmt: skip
    with pytest.raises(ConfigError, match="'sft' has no on-policy mode"):
        load_config(None, {**base, "method": "sft", "on_policy_ratio": 0.5})


def test_mini_on_policy_config_runs(base_overrides, tmp_path, capsys):
    out = tmp_path / "run"
    keys = ("student_raw", "teacher_ft", "teacher_raw", "tokenizer", "dataset", "max_length",
            "max_prompt_length", "device", "progress")  # fmt: skip
    world = [f"{k}={base_overrides[k]}" for k in keys]
    code = main(["train", str(REPO / "configs/mini/on_policy.yaml"), f"output_dir={out}",
                 "max_steps=2", *world, "per_device_batch_size=2", "max_new_tokens=8"])  # fmt: skip
    assert code == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert (out / "final" / "model.safetensors").is_file()
