"""MiniLLM: the surrogate matches the paper's formulas, and training lowers the reverse KL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from deltakd.cli import main
from deltakd.errors import ConfigError
from deltakd.train import load_config, train
from deltakd.train.minillm import (
    PT_MASK_KEY,
    ROLLOUT_KEY,
    MiniLLM,
    append_text_rows,
    minillm_terms,
    ppo_policy_term,
    pt_lm_loss,
    whiten,
)

REPO = Path(__file__).resolve().parents[2]


def _reference(zs, zt, labels, mask, *, mix, clip, length_norm):
    """The module docstring's surrogate written out position by position."""
    logq = torch.log_softmax(zs.double(), -1)
    logp = torch.log_softmax(zt.double(), -1)
    b, t = labels.shape
    total = torch.zeros((), dtype=torch.float64)
    for i in range(b):
        pos = [j for j in range(t) if mask[i, j]]
        r = {j: float((logp[i, j, labels[i, j]] - logq[i, j, labels[i, j]]).detach()) for j in pos}
        for j in pos:
            later = [r[k] for k in pos if k > j]
            ret = (sum(later) / len(later) if later else 0.0) if length_norm else sum(later)
            q_y = logq[i, j, labels[i, j]].exp()
            mixed = mix * logp[i, j, labels[i, j]].exp() + (1 - mix) * q_y
            w = float((q_y / mixed).detach())
            if clip is not None:
                w = min(w, clip)
            kl = (logq[i, j].exp() * (logq[i, j] - logp[i, j])).sum()
            total = total + w * kl - w * ret * logq[i, j, labels[i, j]]
    return total


@pytest.mark.parametrize(
    ("mix", "clip", "length_norm", "cliprange"),
    [(0.2, 1.0, True, float("inf")), (0.2, 1.0, True, None), (0.0, None, False, 0.2),
     (0.5, None, True, 0.2)],
)  # fmt: skip
def test_one_update_without_normalisation_is_the_earlier_surrogate(mix, clip, length_norm,
                                                                   cliprange):  # fmt: skip
    """ppo_epochs = 1, no advantage whitening: value and gradient are those of the earlier
    code's surrogate Σ w·KL − w·R̄·log q (`_reference`); with importance_clip 1.0 and no PPO
    clip that is exactly the earlier default. At the first update ρ = 1, so the PPO clip
    changes nothing either."""
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(2, 6, 11, generator=g).requires_grad_(True)
    zt = torch.randn(2, 6, 11, generator=g) * 2
    labels = torch.randint(0, 11, (2, 6), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]).bool()
    got, rkl, _ = minillm_terms(zs, zt, labels, mask, teacher_mix=mix, importance_clip=clip,
                                length_norm=length_norm, advantage_norm=False,
                                cliprange=cliprange)  # fmt: skip
    ref = _reference(zs, zt, labels, mask, mix=mix, clip=clip, length_norm=length_norm)
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-6)
    (g_got,) = torch.autograd.grad(got, zs)
    (g_ref,) = torch.autograd.grad(ref, zs)
    torch.testing.assert_close(g_got, g_ref.float(), rtol=1e-4, atol=1e-6)
    logq, logp = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    exact = (logq.exp() * (logq - logp)).sum(-1)[mask].sum()
    assert float(rkl) == pytest.approx(float(exact.detach()), rel=1e-5)


def test_gradient_is_zero_when_the_student_is_the_teacher():
    z = torch.randn(2, 5, 9)
    zs = z.clone().requires_grad_(True)
    labels = torch.randint(0, 9, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    loss, rkl, _ = minillm_terms(zs, z, labels, mask)
    loss.backward()
    assert float(rkl) == pytest.approx(0.0, abs=1e-6)
    assert zs.grad.abs().max() < 1e-6


def test_single_token_gradient_is_the_exact_reverse_kl_gradient():
    # A response of one token has no future reward: only the exact next-token term remains.
    zs = torch.randn(1, 1, 7, requires_grad=True)
    zt = torch.randn(1, 1, 7)
    loss, _, _ = minillm_terms(zs, zt, torch.tensor([[3]]), torch.ones(1, 1, dtype=torch.bool),
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
                                      "max_new_tokens": 12,
                                      # deltakd's earlier MiniLLM: one update per sample. (With
                                      # whitened advantages the tiny world's reverse KL, 0.02
                                      # nats at the start, is dominated by the amplified noise
                                      # of near-zero rewards in 6 steps.)
                                      "method_args": {"ppo_epochs": 1, "cliprange": None,
                                                      "advantage_norm": False,
                                                      "importance_clip": 1.0}}))  # fmt: skip
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
    old = torch.randn(2, 6, generator=g) - 2.0  # a later PPO update: ρ ≠ 1, some clipped
    a, rkl_a, _ = minillm_terms(zs_a, zt, labels, mask, temperature=1.3, old_logq=old)
    b, rkl_b, _ = minillm_terms(zs_b, zt, labels, mask, temperature=1.3, old_logq=old,
                                chunk_size=chunk)  # fmt: skip
    (ga,) = torch.autograd.grad(a, zs_a)
    (gb,) = torch.autograd.grad(b, zs_b)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(rkl_a, rkl_b)
    torch.testing.assert_close(ga, gb)
    assert float(a.detach().abs()) > 0 and ga.abs().max() > 0
    assert ga[~mask].abs().max() == 0  # uncounted positions get no gradient


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(2, 6, 11, generator=g).requires_grad_(True)
    zt = torch.randn(2, 6, 11, generator=g) * 2
    labels = torch.randint(0, 11, (2, 6), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]).bool()
    return zs, zt, labels, mask


def test_the_ppo_ratio_is_one_at_the_first_update_so_clipping_changes_nothing():
    zs, zt, labels, mask = _case(1)
    kw = dict(teacher_mix=0.2, advantage_norm=True)
    clipped = minillm_terms(zs, zt, labels, mask, cliprange=0.2, **kw)
    free = minillm_terms(zs, zt, labels, mask, cliprange=None, **kw)
    # The first update's q_old is the current student: passing it explicitly changes nothing.
    explicit = minillm_terms(zs, zt, labels, mask, cliprange=0.2,
                             old_logq=clipped.logq_y.clone(), **kw)  # fmt: skip
    for other in (free, explicit):
        torch.testing.assert_close(other.surrogate, clipped.surrogate)
        (a,) = torch.autograd.grad(clipped.surrogate, zs, retain_graph=True)
        (b,) = torch.autograd.grad(other.surrogate, zs, retain_graph=True)
        torch.testing.assert_close(a, b)
    # At a later update (q_old ≠ q_θ) the clip does change the gradient.
    old = clipped.logq_y.detach() - 0.5 * mask.float()  # ρ = e^0.5 ≈ 1.65 everywhere
    later_c = minillm_terms(zs, zt, labels, mask, cliprange=0.2, old_logq=old, **kw)
    later_f = minillm_terms(zs, zt, labels, mask, cliprange=None, old_logq=old, **kw)
    (a,) = torch.autograd.grad(later_c.surrogate, zs)
    (b,) = torch.autograd.grad(later_f.surrogate, zs)
    assert (a - b).abs().max() > 1e-3


def test_the_clipped_side_has_no_gradient():
    eps = 0.2
    # ρ = 1.5 with A > 0 and ρ = 0.5 with A < 0 lie on the clipped side: no gradient. The
    # mirrored cases (ρ = 1.5, A < 0; ρ = 0.5, A > 0) keep the unclipped −A·ρ and its gradient.
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0])
    old = torch.zeros(5)
    logq = ratio.log().clone().requires_grad_(True)
    loss = ppo_policy_term(logq, old, adv, eps)
    (grad,) = torch.autograd.grad(loss.sum(), logq)
    torch.testing.assert_close(grad[:2], torch.zeros(2))
    torch.testing.assert_close(grad[2:], -adv[2:] * ratio[2:])  # d(−A·e^x)/dx = −A·ρ
    torch.testing.assert_close(loss.detach(), torch.tensor([-1.2, 0.8, 1.5, -0.5, -1.1]))


def test_whitened_advantages_have_zero_mean_and_unit_variance():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 8, generator=g) * 5 + 3
    mask = torch.rand(3, 8, generator=g) > 0.3
    w = whiten(x, mask)
    var, mean = torch.var_mean(w[mask])
    assert abs(float(mean)) < 1e-6 and float(var) == pytest.approx(1.0, rel=1e-5)
    assert (w[~mask] == 0).all()
    # Inside minillm_terms: the normalised policy term is the unnormalised one with A whitened.
    zs, zt, labels, mask = _case(3)
    normed = minillm_terms(zs, zt, labels, mask, advantage_norm=True, teacher_mix=0.0)
    raw = minillm_terms(zs, zt, labels, mask, advantage_norm=False, teacher_mix=0.0)
    assert abs(float((normed.surrogate - raw.surrogate).detach())) > 1e-4


def _pt_batch(with_pt: bool, seed: int = 5):
    """A StudentBatch of 2 sampled rows (and, with_pt, 2 pretraining-text rows appended), the
    teacher's logits as references."""
    from deltakd.references.base import ReferenceBatch
    from deltakd.train.methods import StudentBatch
    from deltakd.train.trainer import RoleLogits

    g = torch.Generator().manual_seed(seed)
    v, t = 11, 7
    ids = torch.randint(1, v, (2, t), generator=g)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones(2, t, dtype=torch.long),
        "assistant_mask": torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]]).bool(),
        "row_index": torch.tensor([4, 9]),
    }
    if with_pt:
        inputs = append_text_rows(inputs, [[3, 4, 5, 6, 7, 8, 9, 2, 1], [5, 6]], pad_id=0)
    n, width = inputs["input_ids"].shape
    zs_all = torch.randn(4, 9, v, generator=g)
    zt_all = torch.randn(4, 9, v, generator=g) * 2
    zs = zs_all[:n, :width].clone().requires_grad_(True)  # (B, T, V)
    zt = zt_all[:n, :width]
    mask = inputs["assistant_mask"][:, 1:] & inputs["attention_mask"][:, 1:].bool()
    batch = StudentBatch(inputs["input_ids"], inputs["attention_mask"], zs[:, :-1],
                         inputs["input_ids"][:, 1:], mask, inputs)  # fmt: skip
    refs = RoleLogits(ReferenceBatch(logits={"teacher_ft": zt}), {}, v, torch.device("cpu"))
    return batch, refs, zs


def test_pretraining_rows_and_weight():
    cfg_args = {"pt_dataset": "mini:corpus"}
    base = {"student_raw": "s", "teacher_ft": "f", "output_dir": "o", "method": "minillm"}
    method = MiniLLM()
    plain_b, plain_r, _ = _pt_batch(False)
    with_b, with_r, with_z = _pt_batch(True)
    assert with_b.inputs["row_index"].tolist() == [4, 9, -1, -1]
    assert with_b.inputs[PT_MASK_KEY].sum() == 9 + 2 and with_b.mask[2:].sum() == 0
    plain = method.compute(plain_b, plain_r, load_config(None, base))
    zero = method.compute(with_b, with_r, load_config(None, {
        **base, "method_args": {**cfg_args, "pt_weight": 0.0}}))  # fmt: skip
    # pt_weight = 0: exactly the loss without a pretraining term.
    torch.testing.assert_close(zero.total, plain.total)
    assert zero.sft is None
    one = method.compute(with_b, with_r, load_config(None, {
        **base, "method_args": {**cfg_args, "pt_weight": 0.5}}))  # fmt: skip
    ce = pt_lm_loss(with_b.student_logits, with_b.labels, with_b.inputs[PT_MASK_KEY])
    # Reference: the mean next-token cross-entropy over the 8 + 1 predictable text positions.
    logits = with_z[2:, :-1]
    labels = with_b.input_ids[2:, 1:]
    pairs = [(0, j) for j in range(8)] + [(1, 0)]
    want = sum(torch.nn.functional.cross_entropy(logits[i, j], labels[i, j]) for i, j in pairs)
    torch.testing.assert_close(ce, want / 9)
    n_rl = float(with_b.mask.sum())
    torch.testing.assert_close(one.total, plain.total + 0.5 * ce * n_rl)
    torch.testing.assert_close(one.sft, ce.detach() * n_rl)


def test_load_texts_reads_the_mini_corpus_and_files(tmp_path):
    from deltakd.data.mini.corpus import make_corpus
    from deltakd.data.specs import load_texts
    from deltakd.errors import DataError

    texts = load_texts("mini:corpus", limit=5)
    assert texts == make_corpus(0, n_docs=6000)[:5] and all(isinstance(t, str) for t in texts)
    (tmp_path / "a.txt").write_text("one doc\n\nanother doc\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["one doc", "another doc"]
    (tmp_path / "b.jsonl").write_text('{"text": "x y"}\n{"txt": 1}\n')
    with pytest.raises(DataError, match="line 2 has no string field 'text'"):
        load_texts(str(tmp_path / "b.jsonl"))
    with pytest.raises(ConfigError, match=r"pt_dataset.*not recognised"):
        load_config(None, {"student_raw": "s", "teacher_ft": "f", "output_dir": "o",
                           "method": "minillm", "method_args": {"pt_dataset": "corpus"}})  # fmt: skip


def test_a_rollout_is_reused_for_ppo_epochs_steps(base_overrides, tmp_path, monkeypatch):
    seen: list[tuple[int, torch.Tensor, bool]] = []
    original = MiniLLM.prepare_batch

    def spy(self, trainer, model, inputs):
        out = original(self, trainer, model, inputs)
        assert ROLLOUT_KEY in out  # ppo_epochs > 1: the batch belongs to a stored rollout
        seen.append((trainer.state.global_step, out["input_ids"].clone(), PT_MASK_KEY in out))
        return out

    monkeypatch.setattr(MiniLLM, "prepare_batch", spy)
    result = train(load_config(None, {**base_overrides, "output_dir": str(tmp_path / "r"),
                                      "method": "minillm", "max_steps": 5, "limit": 4,
                                      "max_new_tokens": 8, "per_device_batch_size": 2,
                                      "method_args": {"ppo_epochs": 2, "pt_dataset": "mini:corpus",
                                                      "pt_weight": 0.5}}))  # fmt: skip
    assert [s for s, _, _ in seen] == [0, 1, 2, 3, 4] and all(pt for _, _, pt in seen)
    sampled = [ids[:2] for _, ids, _ in seen]  # the sampled rows (the text rows follow)

    def same(a, b):
        w = min(a.shape[1], b.shape[1])
        return torch.equal(a[:, :w], b[:, :w]) and not a[:, w:].any() and not b[:, w:].any()

    assert same(sampled[0], sampled[1]) and same(sampled[2], sampled[3])  # reused
    assert not same(sampled[1], sampled[2]) or not same(sampled[3], sampled[4])  # resampled
    assert len(result.losses("sft_loss")) == 5  # the pretraining LM loss is logged


def test_minillm_loss_goes_down_on_the_mini_world(tmp_path):
    """A short run of the shipped config (authors' settings plus the pretraining term) on
    the mini world: the reverse KL on the student's own samples falls."""
    cfg = load_config(str(REPO / "configs/mini/minillm.yaml"), {
        "output_dir": str(tmp_path / "r"), "max_steps": 8, "logging_steps": 1, "save_steps": 0,
        "per_device_batch_size": 4, "max_new_tokens": 24, "learning_rate": 3e-4,
        "warmup_ratio": 0.0, "lr_scheduler": "constant", "progress": False})  # fmt: skip
    result = train(cfg)
    kd = [v for _, v in result.losses("kd_loss")]
    assert len(kd) == 8
    first, second = kd[:4], kd[4:]  # two rollouts of ppo_epochs = 4 updates each
    # On a fixed rollout the PPO updates lower its reverse KL step by step...
    assert first[-1] < first[0] and second[-1] < second[0], kd
    # ...and the second rollout, sampled from the updated student, starts lower on average.
    assert sum(second) < sum(first), kd
    assert len(result.losses("sft_loss")) == 8  # the pretraining LM term is on and logged


def test_resume_at_a_rollout_boundary_equals_uninterrupted(base_overrides, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from deltakd.train.trainer import DistillTrainer

    over = {**base_overrides, "method": "minillm", "max_steps": 4, "save_steps": 2, "limit": 4,
            "per_device_batch_size": 2, "gradient_accumulation_steps": 2, "max_new_tokens": 8,
            "learning_rate": 3e-3, "resume": "auto",
            "method_args": {"ppo_epochs": 2, "pt_dataset": "mini:corpus"}}  # fmt: skip

    def run(out):
        return train(load_config(None, {**over, "output_dir": str(out)}))

    full = run(tmp_path / "full")
    original = DistillTrainer._save_rng_state

    def crash(self, output_dir):
        if self.state.global_step == 4:
            raise KeyboardInterrupt("simulated kill during save")
        return original(self, output_dir)

    monkeypatch.setattr(DistillTrainer, "_save_rng_state", crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crash")
    monkeypatch.setattr(DistillTrainer, "_save_rng_state", original)
    resumed = run(tmp_path / "crash")  # from checkpoint-2: step 2 starts a rollout
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("checkpoint-2")
    assert resumed.losses() == full.losses()
    wa = load_file(str(full.output_dir / "final" / "model.safetensors"))
    wb = load_file(str(resumed.output_dir / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_stored_rollout_keeps_its_first_updates_q_old():
    from deltakd.train.minillm import _RolloutSlot

    cfg = load_config(None, {"student_raw": "s", "teacher_ft": "f", "output_dir": "o",
                             "method": "minillm"})  # fmt: skip
    method = MiniLLM()
    batch, refs, _ = _pt_batch(False)
    slot = _RolloutSlot()
    batch.inputs[ROLLOUT_KEY] = slot
    first = method.compute(batch, refs, cfg)
    logq = torch.log_softmax(batch.student_logits.detach(), -1)
    want = logq.gather(-1, batch.labels[..., None]).squeeze(-1)[batch.mask]
    torch.testing.assert_close(slot.old_logq, want)  # q_old = the student at the first update
    # A later update (the student moved): the stored q_old is used, not the current student's.
    moved = batch.student_logits.detach() + 0.7 * torch.randn_like(batch.student_logits)
    later = _with_logits(batch, moved)
    kept = method.compute(later, refs, cfg)
    fresh_batch = _with_logits(batch, moved, inputs={k: v for k, v in batch.inputs.items()
                                                          if k != ROLLOUT_KEY})  # fmt: skip
    fresh = method.compute(fresh_batch, refs, cfg)
    assert abs(float((kept.total - fresh.total).detach())) > 1e-4
    torch.testing.assert_close(slot.old_logq, want)  # not overwritten
    assert first.kd is not None


def _with_logits(batch, logits, inputs=None):
    from dataclasses import replace

    return replace(batch, student_logits=logits, inputs=batch.inputs if inputs is None else inputs)


def test_mini2_corpus_is_world_v2s_pretraining_corpus():
    import json

    from deltakd.data.mini import load_task, mini_world_dir
    from deltakd.data.mini.corpus import make_corpus_v2
    from deltakd.data.specs import check_text_spec, load_texts

    check_text_spec("mini2:corpus")
    info = json.loads((mini_world_dir("v2") / "world.json").read_text())
    texts = load_texts("mini2:corpus")
    # the documents world v2's raw models were pretrained on (its recorded build), not v1's
    assert len(texts) == info["build"]["corpus_docs"] == 9000
    assert texts[:20] == make_corpus_v2(0, n_docs=9000, chat_share=0.05)[:20]
    assert texts[:20] != load_texts("mini:corpus", limit=20)
    corpus = "\n".join(texts)
    held = [r["messages"][0]["content"] for t in ("instruct", "math")
            for r in load_task(t, "test", limit=50)]  # fmt: skip
    assert not [p for p in held if p in corpus]  # no test prompt leaks into the pt term
