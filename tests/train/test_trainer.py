"""End-to-end training on the tiny world: every method learns, resume is exact, guards fire."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from deltakd.errors import NonFiniteError
from deltakd.references.base import ReferenceBatch, ReferenceSource
from deltakd.references.local import LocalReferences
from deltakd.train import load_config, train
from deltakd.train.trainer import DistillTrainer


def _run(base: dict, out: Path, **over: Any):
    return train(load_config(None, {**base, "output_dir": str(out), **over}))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("sft", {}),
        ("kd", {"divergence": "jsd", "beta": 0.3}),
        ("delta_kd", {"alpha": 1.0, "lam": 0.2}),
        ("parallelogram", {"variant": "delta_rkl", "alpha": 0.5}),
    ],
)
def test_each_method_loss_goes_down(base_overrides, tmp_path, method, extra):
    # One fixed batch of 4 rows repeated (no shuffle): the loss must fall within a few steps.
    result = _run(base_overrides, tmp_path / method, method=method, max_steps=5, shuffle=False,
                  limit=4, **extra)  # fmt: skip
    losses = [v for _, v in result.losses()]
    assert len(losses) == 5
    assert losses[-1] < 0.9 * losses[0], losses
    last = result.history[-2]  # the last per-step log (the final entry is the run summary)
    assert {"grad_norm", "tokens_per_s", "ref_wait_s", "sft_loss"} <= set(last)
    if method != "sft":
        assert "kd_loss" in last
        # loss = λ·SFT + (1−λ)·KD over the same counted tokens
        lam = extra.get("lam", 0.0)
        assert last["loss"] == pytest.approx(
            lam * last["sft_loss"] + (1 - lam) * last["kd_loss"], rel=1e-5
        )
    else:
        assert last["loss"] == pytest.approx(last["sft_loss"], rel=1e-5)
    history = [
        json.loads(line) for line in (result.output_dir / "history.jsonl").read_text().splitlines()
    ]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4, 5]


def test_final_student_loads_with_auto_classes(base_overrides, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = _run(base_overrides, tmp_path / "r", method="delta_kd", max_steps=1)
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    tok = AutoTokenizer.from_pretrained(result.final_dir)
    assert tok.chat_template is not None
    trained = _weights(result.output_dir)
    assert all(torch.equal(p.detach(), trained[n]) for n, p in model.named_parameters())
    assert (result.output_dir / "config.yaml").is_file()
    assert json.loads((result.output_dir / "data_stats.json").read_text())["kept"] == 8


def test_gradient_accumulation_normalises_over_the_whole_batch(base_overrides, tmp_path):
    # Rows have different response lengths, so averaging per micro-batch would weight tokens
    # differently from one batch of 4; token-normalising the whole step must not.
    common = dict(method="delta_kd", lam=0.5, max_steps=2, shuffle=False, learning_rate=1e-3)
    one = _run(base_overrides, tmp_path / "one", per_device_batch_size=4, **common)
    acc = _run(base_overrides, tmp_path / "acc", per_device_batch_size=2,
               gradient_accumulation_steps=2, **common)  # fmt: skip
    for (_, a), (_, b) in zip(one.losses(), acc.losses(), strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    wa, wb = _weights(one.output_dir), _weights(acc.output_dir)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6)


def test_resume_after_crash_during_save_equals_uninterrupted(base_overrides, tmp_path, monkeypatch):
    common = dict(method="delta_kd", max_steps=4, save_steps=2, per_device_batch_size=2,
                  gradient_accumulation_steps=2, learning_rate=3e-3, lr_scheduler="cosine",
                  warmup_steps=1, resume="auto")  # fmt: skip
    full = _run(base_overrides, tmp_path / "full", **common)

    # Crash half-way through writing checkpoint-4: checkpoint-2 must stay intact and be used.
    original = DistillTrainer._save_rng_state

    def crash(self, output_dir):
        if self.state.global_step == 4:
            raise KeyboardInterrupt("simulated kill during save")
        return original(self, output_dir)

    monkeypatch.setattr(DistillTrainer, "_save_rng_state", crash)
    with pytest.raises(KeyboardInterrupt):
        _run(base_overrides, tmp_path / "crash", **common)
    monkeypatch.setattr(DistillTrainer, "_save_rng_state", original)
    run_dir = tmp_path / "crash"
    assert (run_dir / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (run_dir / "checkpoint-4").exists()
    assert (run_dir / ".tmp-checkpoint-4").exists()  # the half-written one, never resumed from
    assert not (run_dir / "final").exists()

    resumed = _run(base_overrides, tmp_path / "crash", **common)
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("checkpoint-2")
    assert resumed.losses() == full.losses()  # bit-identical on CPU, including steps 1-2

    # Steps 3-4 were logged before the crash and again after the resume: listed once.
    def logged(d):
        rows = [json.loads(x) for x in (d / "history.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    assert logged(run_dir) == logged(tmp_path / "full") and len(logged(run_dir)) == 4
    wa, wb = _weights(full.output_dir), _weights(resumed.output_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class _NaNOnce(ReferenceSource):
    """Wraps a source and poisons one role's logits for one micro-batch key."""

    def __init__(self, inner: ReferenceSource, role: str, key: int) -> None:
        self.inner, self.role, self.key = inner, role, key
        self.roles = inner.roles

    def fetch(self, key: int, batch: Mapping[str, torch.Tensor]) -> ReferenceBatch:
        out = self.inner.fetch(key, batch)
        if key == self.key:
            out.logits[self.role] = out.logits[self.role].clone()
            out.logits[self.role][0, :, 5] = float("nan")  # row 0, every position
        return out


def _poisoned(tiny_world: dict) -> _NaNOnce:
    paths = {r: str(tiny_world[r]) for r in ("teacher_ft", "teacher_raw", "student_raw")}
    return _NaNOnce(LocalReferences(paths), "teacher_raw", key=1)


def test_nan_reference_logits_stop_with_role_and_batch(base_overrides, tiny_world, tmp_path):
    cfg = load_config(None, {**base_overrides, "output_dir": str(tmp_path / "r"),
                             "method": "delta_kd", "max_steps": 3, "shuffle": False,
                             "per_device_batch_size": 2})  # fmt: skip
    with pytest.raises(NonFiniteError) as err:
        train(cfg, references=_poisoned(tiny_world))
    msg = str(err.value)
    assert "teacher_raw" in msg and "micro-batch 1" in msg and "nonfinite=skip" in msg
    assert "dataset rows [2]" in msg  # row 3 in the file, 0-based index 2 (first of batch 1)


@pytest.mark.parametrize("fused", [False, True])
def test_nan_reference_logits_skipped_when_configured(base_overrides, tiny_world, tmp_path, fused):
    cfg = load_config(None, {**base_overrides, "output_dir": str(tmp_path / "r"),
                             "method": "delta_kd", "max_steps": 3, "shuffle": False,
                             "per_device_batch_size": 2, "nonfinite": "skip", "fused_loss": fused})  # fmt: skip
    result = train(cfg, references=_poisoned(tiny_world))
    assert result.metrics["skipped_batches"] == 1
    assert [h.get("skipped_batches") for h in result.history if "loss" in h] == [None, 1, None]
    assert all(torch.isfinite(w).all() for w in _weights(result.output_dir).values())


@pytest.fixture(scope="module")
def padded_world(tmp_path_factory, tiny_world):
    """The tiny world's roles with embeddings padded beyond the tokenizer, differently per role
    (as Qwen2.5-7B's 152064 rows vs 1.5B's 151936 vs the tokenizer's 151665)."""
    from deltakd.data.vocab import load_tokenizer
    from tests.conftest import make_model

    root = tmp_path_factory.mktemp("padded_world")
    v = tiny_world["vocab_size"]
    tok = load_tokenizer(str(tiny_world["tokenizer"]))
    out = {}
    for role, rows, hidden, seed in (("teacher_ft", v + 13, 32, 2), ("teacher_raw", v + 13, 32, 1),
                                     ("student_raw", v + 7, 16, 3)):  # fmt: skip
        out[role] = str(make_model(root / role, rows, hidden=hidden, layers=1, seed=seed))
        tok.save_pretrained(out[role])
    return out


def test_padded_vocabularies_are_sliced_to_the_tokenizer(base_overrides, padded_world, tiny_world,
                                                         tmp_path):  # fmt: skip
    from deltakd.train.trainer import RoleLogits

    v = tiny_world["vocab_size"]
    src = LocalReferences(padded_world)
    ids = torch.randint(3, v, (2, 6))
    ref = src.fetch(0, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert ref.logits["teacher_ft"].shape[-1] == v + 13
    role_logits = RoleLogits(ref, {}, v, torch.device("cpu"))
    sliced = role_logits.logits("teacher_ft")
    assert sliced.shape == (2, 5, v)
    assert torch.equal(sliced, ref.logits["teacher_ft"][:, :-1, :v])

    result = _run({**base_overrides, **padded_world}, tmp_path / "r", method="delta_kd",
                  max_steps=3, shuffle=False, limit=4)  # fmt: skip
    losses = [v for _, v in result.losses("kd_loss")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert _weights(result.output_dir)["lm_head.weight"].shape[0] == v + 7  # padding kept


@pytest.mark.parametrize(("method", "extra"), [("delta_kd", {"lam": 0.3}),
                                               ("parallelogram", {"variant": "live_anchor_sg"})])  # fmt: skip
def test_fused_loss_matches_unfused(base_overrides, tmp_path, method, extra):
    common = dict(method=method, max_steps=2, shuffle=False, limit=4, learning_rate=1e-3, **extra)
    plain = _run(base_overrides, tmp_path / "plain", **common)
    fused = _run(base_overrides, tmp_path / "fused", fused_loss=True, chunk_size=16, **common)
    for key in ("loss", "kd_loss") + (("sft_loss",) if extra.get("lam") else ()):
        for (_, a), (_, b) in zip(plain.losses(key), fused.losses(key), strict=True):
            assert a == pytest.approx(b, rel=1e-4), key
    wa, wb = _weights(plain.output_dir), _weights(fused.output_dir)
    for k in wa:
        # Adam divides by √v: a 1e-7 gradient difference on a near-zero gradient shows.
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-5)


class _PoisonGrad:
    """Callback: multiplies the lm_head gradient by `factor` (NaN by default) at optimizer step
    `step` (0-based)."""

    def __init__(self, step: int, factor: float = float("nan")) -> None:
        self.step, self.factor = step, factor

    def __getattr__(self, name: str):  # every other TrainerCallback event: do nothing
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, model=None, **kw):
        def hook(grad):
            return grad * self.factor if state.global_step == self.step else grad

        model.lm_head.weight.register_hook(hook)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_gradients_stop_or_skip_the_step(base_overrides, tmp_path, mode):
    cfg = load_config(None, {**base_overrides, "output_dir": str(tmp_path / "r"), "method": "sft",
                             "max_steps": 3, "nonfinite": mode, "report_to": "csv"})  # fmt: skip
    if mode == "stop":
        with pytest.raises(
            NonFiniteError, match=r"gradient norm is nan at optimizer step 1.*nonfinite=skip"
        ):
            train(cfg, callbacks=[_PoisonGrad(1)])
        return
    result = train(cfg, callbacks=[_PoisonGrad(1)])
    assert result.metrics["skipped_steps"] == 1 and result.global_step == 3
    assert all(torch.isfinite(w).all() for w in _weights(result.output_dir).values())
    header = (result.output_dir / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("step,epoch,loss,sft_loss,kd_loss,grad_norm")


class _Recorder(ReferenceSource):
    """Records the order of prefetch / fetch calls and checks fetch gets the prefetched batch."""

    def __init__(self, inner: ReferenceSource) -> None:
        self.inner, self.roles, self.events, self.seen = inner, inner.roles, [], {}

    def prefetch(self, key: int, batch: Mapping[str, torch.Tensor]) -> None:
        self.events.append(("prefetch", key))
        self.seen[key] = batch["input_ids"].clone()

    def fetch(self, key: int, batch: Mapping[str, torch.Tensor]) -> ReferenceBatch:
        self.events.append(("fetch", key))
        assert torch.equal(self.seen[key], batch["input_ids"])
        return self.inner.fetch(key, batch)


def test_references_are_prefetched_a_step_ahead(base_overrides, tiny_world, tmp_path):
    paths = {r: str(tiny_world[r]) for r in ("teacher_ft", "teacher_raw", "student_raw")}
    rec = _Recorder(LocalReferences(paths))
    cfg = load_config(None, {**base_overrides, "output_dir": str(tmp_path / "r"),
                             "method": "delta_kd", "max_steps": 2, "per_device_batch_size": 2,
                             "gradient_accumulation_steps": 2})  # fmt: skip
    train(cfg, references=rec)
    # Step 1's two micro-batches, then step 2's (look-ahead), are requested before step 1 trains.
    assert rec.events == [("prefetch", 0), ("prefetch", 1), ("prefetch", 2), ("prefetch", 3),
                          ("fetch", 0), ("fetch", 1), ("fetch", 2), ("fetch", 3)]  # fmt: skip


def test_gradient_norm_spikes_are_logged(base_overrides, tmp_path):
    cfg = load_config(None, {**base_overrides, "output_dir": str(tmp_path / "r"), "method": "sft",
                             "max_steps": 7, "max_grad_norm": 0.0, "learning_rate": 1e-4})  # fmt: skip
    result = train(cfg, callbacks=[_PoisonGrad(6, factor=1e4)])
    assert result.metrics["grad_norm_spikes"] == 1
    logs = [h for h in result.history if "loss" in h]
    assert "grad_norm_spikes" not in logs[5] and logs[6]["grad_norm_spikes"] == 1


class _HiddenStates(ReferenceSource):
    """Answers with last hidden states + lm_heads, as a teacher server may."""

    def __init__(self, local: LocalReferences) -> None:
        self.local, self.roles = local, local.roles

    @torch.no_grad()
    def fetch(self, key: int, batch: Mapping[str, torch.Tensor]) -> ReferenceBatch:
        hidden = {}
        for role, model in self.local.models.items():
            out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            hidden[role] = out.last_hidden_state
        return ReferenceBatch(hidden=hidden)

    def lm_heads(self) -> dict[str, torch.Tensor]:
        return {r: m.lm_head.weight.detach() for r, m in self.local.models.items()}


@pytest.mark.parametrize("fused", [False, True])
def test_hidden_state_references_equal_logits(base_overrides, tiny_world, tmp_path, fused):
    paths = {r: str(tiny_world[r]) for r in ("teacher_ft", "teacher_raw", "student_raw")}
    over = {**base_overrides, "method": "delta_kd", "max_steps": 2, "shuffle": False, "limit": 4,
            "fused_loss": fused}  # fmt: skip
    a = train(load_config(None, {**over, "output_dir": str(tmp_path / "a")}),
              references=LocalReferences(paths))  # fmt: skip
    b = train(load_config(None, {**over, "output_dir": str(tmp_path / "b")}),
              references=_HiddenStates(LocalReferences(paths)))  # fmt: skip
    for (_, x), (_, y) in zip(a.losses("kd_loss"), b.losses("kd_loss"), strict=True):
        assert x == pytest.approx(y, rel=1e-5)


def test_rerunning_a_finished_run_trains_nothing_and_extending_continues(base_overrides, tmp_path):
    over = dict(method="sft", max_steps=2, resume="auto")  # save_steps=0: last step only
    first = _run(base_overrides, tmp_path / "r", **over)
    first_weights = _weights(first.output_dir)
    assert (tmp_path / "r" / "checkpoint-2").is_dir()
    again = _run(base_overrides, tmp_path / "r", **over)
    assert again.global_step == 2 and again.resumed_from.endswith("checkpoint-2")
    assert again.losses() == first.losses()
    again_weights = _weights(again.output_dir)
    assert all(torch.equal(first_weights[k], again_weights[k]) for k in first_weights)
    longer = _run(base_overrides, tmp_path / "r", **{**over, "max_steps": 3})
    assert longer.global_step == 3 and [s for s, _ in longer.losses()] == [1, 2, 3]
    assert longer.losses()[:2] == first.losses()


class _SendSigterm:
    """Callback: the process receives SIGTERM at the end of optimizer step `step` (1-based)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_checkpoints_stops_and_resumes_exactly(base_overrides, tmp_path):
    import signal

    common = dict(method="delta_kd", max_steps=4, save_steps=0, per_device_batch_size=2,
                  resume="auto", lr_scheduler="cosine", learning_rate=3e-3)  # fmt: skip
    full = _run(base_overrides, tmp_path / "full", **common)
    before = signal.getsignal(signal.SIGTERM)
    cfg = load_config(None, {**base_overrides, **common, "output_dir": str(tmp_path / "t")})
    stopped = train(cfg, callbacks=[_SendSigterm(2)])  # SIGTERM during step 2's bookkeeping
    assert stopped.interrupted and stopped.global_step == 2
    assert (tmp_path / "t" / "checkpoint-2").is_dir() and not (tmp_path / "t" / "final").exists()
    assert signal.getsignal(signal.SIGTERM) == before  # handler restored
    resumed = train(cfg)
    assert not resumed.interrupted and resumed.resumed_from.endswith("checkpoint-2")
    assert resumed.losses() == full.losses()
    wa, wb = _weights(full.output_dir), _weights(resumed.output_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class _SparseFromLocal(ReferenceSource):
    """Answers with a ready top-k target of z* (what the offline cache serves)."""

    def __init__(self, local: LocalReferences, k: int) -> None:
        self.local, self.k, self.roles = local, k, local.roles

    def fetch(self, key: int, batch: Mapping[str, torch.Tensor]) -> ReferenceBatch:
        from deltakd.losses import SparseTarget, delta_target

        z = self.local.fetch(key, batch).logits
        target = delta_target(z["teacher_ft"], z["teacher_raw"], z["student_raw"], alpha=1.0)
        return ReferenceBatch(target=SparseTarget.from_logits(target, self.k))


def test_sparse_targets_train_delta_kd_and_parallelogram_alike(base_overrides, tiny_world,
                                                                tmp_path):  # fmt: skip
    paths = {r: str(tiny_world[r]) for r in ("teacher_ft", "teacher_raw", "student_raw")}
    results = {}
    for method, extra in (("delta_kd", {}), ("parallelogram", {"variant": "delta"})):
        cfg = load_config(None, {**base_overrides, "output_dir": str(tmp_path / method),
                                 "method": method, "max_steps": 3, "shuffle": False, "limit": 4,
                                 **extra})  # fmt: skip
        results[method] = train(cfg, references=_SparseFromLocal(LocalReferences(paths), k=16))
    a = [v for _, v in results["delta_kd"].losses("kd_loss")]
    b = [v for _, v in results["parallelogram"].losses("kd_loss")]
    assert a == pytest.approx(b, rel=1e-6) and a[-1] < a[0]
