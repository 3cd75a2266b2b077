"""MiniLLM: the surrogate matches the paper's formulas, and training lowers the reverse KL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from deltakd.cli import main
from deltakd.errors import ConfigError
from deltakd.train import load_config, train
from deltakd.train.minillm import MiniLLM, minillm_terms

REPO = Path(__file__).resolve().parents[2]


def _reference(zs, zt, labels, mask, *, mix, clip, length_norm):
    """The module docstring's surrogate written out position by position."""
    logq = torch.log_softmax(zs.double(), -1)
    logp = torch.log_softmax(zt.double(), -1)
    b, t = labels.shape
    total = torch.zeros((), dtype=torch.float64)
    for i in range(b):
        pos = [j for j in range(t) if mask[i, j]]
        r = {j: float(logp[i, j, labels[i, j]] - logq[i, j, labels[i, j]]) for j in pos}
        for j in pos:
            later = [r[k] for k in pos if k > j]
            ret = (sum(later) / len(later) if later else 0.0) if length_norm else sum(later)
            q_y = logq[i, j, labels[i, j]].exp()
            mixed = mix * logp[i, j, labels[i, j]].exp() + (1 - mix) * q_y
            w = float(q_y / mixed)
            if clip is not None:
                w = min(w, clip)
            kl = (logq[i, j].exp() * (logq[i, j] - logp[i, j])).sum()
            total = total + w * kl - w * ret * logq[i, j, labels[i, j]]
    return total


@pytest.mark.parametrize(
    ("mix", "clip", "length_norm"), [(0.2, 1.0, True), (0.0, None, False), (0.5, None, True)]
)
def test_surrogate_matches_the_formulas(mix, clip, length_norm):
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(2, 6, 11, generator=g)
    zt = torch.randn(2, 6, 11, generator=g) * 2
    labels = torch.randint(0, 11, (2, 6), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]).bool()
    got, rkl = minillm_terms(zs, zt, labels, mask, teacher_mix=mix, importance_clip=clip,
                             length_norm=length_norm)  # fmt: skip
    ref = _reference(zs, zt, labels, mask, mix=mix, clip=clip, length_norm=length_norm)
    assert float(got) == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
    logq, logp = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    exact = (logq.exp() * (logq - logp)).sum(-1)[mask].sum()
    assert float(rkl) == pytest.approx(float(exact), rel=1e-5)


def test_gradient_is_zero_when_the_student_is_the_teacher():
    z = torch.randn(2, 5, 9)
    zs = z.clone().requires_grad_(True)
    labels = torch.randint(0, 9, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    loss, rkl = minillm_terms(zs, z, labels, mask)
    loss.backward()
    assert float(rkl) == pytest.approx(0.0, abs=1e-6)
    assert zs.grad.abs().max() < 1e-6


def test_single_token_gradient_is_the_exact_reverse_kl_gradient():
    # A response of one token has no future reward: only the exact next-token term remains.
    zs = torch.randn(1, 1, 7, requires_grad=True)
    zt = torch.randn(1, 1, 7)
    loss, _ = minillm_terms(zs, zt, torch.tensor([[3]]), torch.ones(1, 1, dtype=torch.bool),
                            teacher_mix=0.0)  # fmt: skip
    loss.backward()
    zs2 = zs.detach().clone().requires_grad_(True)
    logq, logp = torch.log_softmax(zs2, -1), torch.log_softmax(zt, -1)
    (logq.exp() * (logq - logp)).sum().backward()
    torch.testing.assert_close(zs.grad, zs2.grad)


def _rkl_on_dataset(base: dict, student_dir: Path, tiny_world: dict) -> float:
    """Mean exact next-token KL(student ‖ teacher_ft) on the dataset's response tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltakd.data.specs import load_rows
    from deltakd.data.tokenize import ChatCollator, encode_rows
    from deltakd.losses import kd_loss

    tok = AutoTokenizer.from_pretrained(tiny_world["tokenizer"])
    enc, _, _ = encode_rows(tok, load_rows(base["dataset"], None, limit=4), max_length=64)
    batch = ChatCollator(pad_token_id=tok.pad_token_id)(
        [{"input_ids": e.input_ids, "assistant_mask": e.assistant_mask} for e in enc]
    )
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_world["teacher_ft"])
    with torch.no_grad():
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        zs, zt = student(**kw).logits, teacher(**kw).logits
    mask = batch["assistant_mask"][:, 1:] & batch["attention_mask"][:, 1:].bool()
    return float(kd_loss(zs[:, :-1], zt[:, :-1], divergence="rkl", mask=mask))


def test_minillm_lowers_the_reverse_kl(base_overrides, tiny_world, tmp_path, monkeypatch):
    calls: list[int] = []
    original = MiniLLM.prepare_batch

    def spy(self, trainer, model, inputs):
        calls.append(trainer.state.global_step)
        out = original(self, trainer, model, inputs)
        assert out["assistant_mask"].sum() > 0 and "on_policy" in out
        return out

    monkeypatch.setattr(MiniLLM, "prepare_batch", spy)
    result = train(load_config(None, {**base_overrides, "output_dir": str(tmp_path / "r"),
                                      "method": "minillm", "max_steps": 6, "limit": 4,
                                      "max_new_tokens": 12}))  # fmt: skip
    assert calls == list(range(6))  # one fresh sample per step, with the current weights
    before = _rkl_on_dataset(base_overrides, tiny_world["student_raw"], tiny_world)
    after = _rkl_on_dataset(base_overrides, result.final_dir, tiny_world)
    assert after < 0.8 * before, (before, after)
    kd = [v for _, v in result.losses("kd_loss")]  # reverse KL on the student's own samples
    assert len(kd) == 6 and kd[-1] < kd[0], kd


def test_bad_minillm_settings_are_refused(base_overrides, tmp_path):
    base = {**base_overrides, "output_dir": str(tmp_path), "method": "minillm"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"lam": 0.5}, "'lam' = 0.5 is not allowed with method 'minillm'"),
        ({"on_policy_ratio": 0.5}, "always trains on the student's own samples"),
        ({"method_args": {"teacher_mix": 1.0}}, r"teacher_mix' = 1.0 .*\[0, 1\)"),
        ({"method_args": {"importance_clip": 0}}, r"importance_clip' = 0.0 .*> 0"),
        ({"method_args": {"mix": 0.1}}, "allowed keys are teacher_mix, importance_clip"),
        ({"references": "cache"}, "not for the student's fresh samples"),
    ]
    for over, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(None, {**base, **over})


def test_mini_minillm_config_runs(base_overrides, tmp_path, capsys):
    out = tmp_path / "run"
    keys = ("student_raw", "teacher_ft", "teacher_raw", "tokenizer", "dataset", "max_length",
            "max_prompt_length", "device", "progress")  # fmt: skip
    world = [f"{k}={base_overrides[k]}" for k in keys]
    code = main(["train", str(REPO / "configs/mini/minillm.yaml"), f"output_dir={out}",
                 "max_steps=2", *world, "per_device_batch_size=2", "max_new_tokens=8"])  # fmt: skip
    assert code == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("chunk", [1, 3])
def test_chunked_surrogate_equals_unchunked(chunk):
    g = torch.Generator().manual_seed(4)
    full = torch.randn(2, 7, 13, generator=g)
    zs_a = full[:, :-1].clone().requires_grad_(True)  # (B, T, V)
    zs_b = full[:, :-1].clone().requires_grad_(True)
    zt = torch.randn(2, 6, 13, generator=g) * 2
    labels = torch.randint(0, 13, (2, 6), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]).bool()
    a, rkl_a = minillm_terms(zs_a, zt, labels, mask, temperature=1.3)
    b, rkl_b = minillm_terms(zs_b, zt, labels, mask, temperature=1.3, chunk_size=chunk)
    (ga,) = torch.autograd.grad(a, zs_a)
    (gb,) = torch.autograd.grad(b, zs_b)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(rkl_a, rkl_b)
    torch.testing.assert_close(ga, gb)
    assert float(a.detach().abs()) > 0 and ga.abs().max() > 0
    assert ga[~mask].abs().max() == 0  # uncounted positions get no gradient
