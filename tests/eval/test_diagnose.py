"""`deltakd diagnose`: definitions on constructed logits, invariants on the shipped mini world,
reference values from its world.json, and the errors for bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deltakd.errors import ConfigError, DataError, VocabularyError
from deltakd.eval import diagnose as dg
from deltakd.eval.diagnose import DiagnoseOptions, centred_cosine, diagnose, shift_cosine

MINI = {
    "method": "delta_kd",
    "alpha": 1.0,
    "student_raw": "mini:student_raw",
    "teacher_ft": "mini:teacher_ft",
    "teacher_raw": "mini:teacher_raw",
    "tokenizer": "mini:tokenizer",
    "dataset": "mini:instruct",
    "max_length": 256,
    "device": "cpu",
    "precision": "fp32",
    "output_dir": "unused",
}


def _config(**changes):
    from deltakd.train.config import load_config

    return load_config(None, {**MINI, **changes})


def _opts(**kw) -> DiagnoseOptions:
    base = dict(rows=3, alphas=(0.0, 0.5, 1.0), progress=False, corpus_docs=20, top_k=(5, 64))
    return DiagnoseOptions(**{**base, **kw})


# --- definitions -------------------------------------------------------------------------------


def test_shift_cosine_known_values():
    zero = torch.zeros(1, 4)
    e0 = torch.tensor([[1.0, 0, 0, 0]])
    e1 = torch.tensor([[0, 1.0, 0, 0]])
    # centred e0 = [.75, -.25, -.25, -.25], centred e1 = [-.25, .75, -.25, -.25]:
    # dot = -0.25, norms² = 0.75 -> cosine −1/3
    assert shift_cosine(e0, zero, e1, zero).item() == pytest.approx(-1 / 3)
    # a constant per position is no shift; scale does not matter; same shift -> 1
    assert shift_cosine(e0 + 7.0, zero, 3 * e0 - 2.0, zero).item() == pytest.approx(1.0)
    # shifts are differences: the "before" logits cancel
    before = torch.randn(5, 4)
    d = torch.randn(5, 4)
    assert torch.allclose(shift_cosine(before + d, before, d + 1.0, zero), torch.ones(5))
    # opposite shifts -> −1; a model that did not move -> 0 (not NaN)
    assert shift_cosine(-e0, zero, e0, zero).item() == pytest.approx(-1.0)
    assert shift_cosine(before + 3.0, before, e0, zero).abs().max().item() < 1e-6
    # on a subset of tokens: e0 and e1 restricted to tokens {0, 2, 3} are (.75, -.25, -.25)
    # and (-.25, -.25, -.25): dot = -0.0625, norms² = 0.6875, 0.1875 -> −0.0625 / √0.1289
    ids = torch.tensor([[0, 2, 3]])
    expected = -0.0625 / math.sqrt(0.6875 * 0.1875)
    assert shift_cosine(e0, zero, e1, zero, tokens=ids).item() == pytest.approx(expected)


def test_centred_cosine_is_shift_invariant():
    z = torch.randn(6, 9)
    assert torch.allclose(centred_cosine(z, z + 5.0), torch.ones(6), atol=1e-6)
    assert torch.allclose(centred_cosine(z, -z), -torch.ones(6), atol=1e-6)


# --- the mini world ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mini_report() -> dict:
    # student_sft: the raw student itself would be a zero shift; any model works for the keys,
    # the invariants below pin the values.
    return diagnose(_config(), _opts(student_sft="mini:teacher_ft"))


def test_alpha_zero_target_is_teacher_ft(mini_report):
    zero = mini_report["per_alpha"]["0"]
    assert zero["kl_teacher_ft_to_target"] == pytest.approx(0.0, abs=1e-6)
    assert zero["target_top1_agree_teacher_ft"] == 1.0
    assert zero["target_top1_agree_reference"] == mini_report["teacher_ft_top1_agree_reference"]
    assert zero["target_entropy"] == pytest.approx(mini_report["teacher_ft_entropy"], rel=1e-5)
    # π_ft's own mass outside its top-k shrinks as k grows
    assert (
        zero["target_mass_outside_teacher_ft_top64"] < zero["target_mass_outside_teacher_ft_top5"]
    )
    # moving the target away from π_ft costs KL, more at α = 1 than at α = 0.5
    one, half = mini_report["per_alpha"]["1"], mini_report["per_alpha"]["0.5"]
    assert 0 < half["kl_teacher_ft_to_target"] < one["kl_teacher_ft_to_target"]


def test_report_keys_and_world_facts(mini_report):
    r = mini_report
    for key in (
        "premise_cosine",
        "teacher_seed_cosine",
        "kl_student_sft_to_target",
        "kl_student_sft_to_teacher_ft",
        "teacher_corpus_loss_ratio",
        "kl_teacher_ft_to_target",
        "raw_top1_agreement",
        "suggested_alpha_range",
    ):
        assert key in r, key
    # the world's second teacher was found beside teacher_raw
    assert r["teacher_ft2"].endswith("teacher_ft2")
    assert -1.0 <= r["teacher_seed_cosine"] <= 1.0
    # student_sft = teacher_ft: its KL to π_ft is exactly zero
    assert r["kl_student_sft_to_teacher_ft"] == pytest.approx(0.0, abs=1e-6)
    # configured α = 1 figures sit at the top level
    assert r["kl_student_sft_to_target"] == r["per_alpha"]["1"]["kl_student_sft_to_target"]
    assert r["positions"] > 0 and r["rows"] == 3


def test_student_copy_of_teacher_premise_holds_exactly():
    # student_raw = teacher_raw and student_sft = teacher_ft: the student's shift IS the
    # teacher's (cosine 1) and z_student_raw − z_teacher_raw = 0, so π* = π_ft at every α.
    config = _config(student_raw="mini:teacher_raw")
    r = diagnose(config, _opts(student_sft="mini:teacher_ft", teacher_ft2="mini:teacher_ft"))
    assert r["premise_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert r["premise_cosine_top64"] == pytest.approx(1.0, abs=1e-5)
    assert r["teacher_seed_cosine"] == pytest.approx(1.0, abs=1e-5)  # a teacher with itself
    assert r["raw_top1_agreement"] == 1.0
    zero = r["per_alpha"]["0"]
    for m in r["per_alpha"].values():
        assert m["kl_teacher_ft_to_target"] == pytest.approx(0.0, abs=1e-6)
        for key in ("target_top1_agree_reference", "teacher_raw_logprob_of_wrong_target_top1"):
            assert m[key] == pytest.approx(zero[key], abs=1e-5)
    assert r["kl_student_sft_to_target"] == pytest.approx(0.0, abs=1e-6)
    assert r["premise_holds"] is False  # not *closer* to π* than to π_ft: equal
    assert r["suggested_alpha_range"] == [0.0, 1.0]


def test_chunks_and_head_paths_give_the_same_figures(monkeypatch):
    config = _config()
    opts = _opts(rows=2)
    # few positions (< H): each role's logits are kept, its head dropped
    whole = diagnose(config, opts)

    def same(other: dict) -> None:
        for alpha, m in whole["per_alpha"].items():
            for key, value in m.items():
                assert other["per_alpha"][alpha][key] == pytest.approx(value, rel=1e-4, abs=1e-6)
        assert other["raw_top1_agreement"] == whole["raw_top1_agreement"]

    # hidden states + head, logits made three positions at a time
    monkeypatch.setattr(dg, "CHUNK_ELEMENTS", 3 * whole["vocab_size"])
    monkeypatch.setattr(dg._Role, "release", lambda self: setattr(self, "model", None))
    same(diagnose(config, opts))
    # logits from the models' own forward instead of the head
    original = dg._Role.__init__

    def no_head(self, *a, **kw):
        original(self, *a, **kw)
        self.head = None

    monkeypatch.setattr(dg._Role, "__init__", no_head)
    same(diagnose(config, opts))


def test_corpus_loss_ratio_matches_world_json():
    # world.json records the held-out corpus loss of each role on 300 documents
    from deltakd.data.mini import mini_world_dir

    info = json.loads((mini_world_dir() / "world.json").read_text())["heldout_corpus_loss"]
    losses = dg._corpus_docs(_config(), _opts(corpus_docs=300))
    assert losses is not None and len(losses[0]) == 300
    from deltakd.loading import load_model, load_tokenizer

    tok = load_tokenizer("mini:tokenizer")
    for role in ("teacher_raw", "teacher_ft"):
        loss = dg._corpus_loss(load_model(f"mini:{role}"), tok, losses[0])
        assert loss == pytest.approx(info[role], abs=2e-3)


def test_kd_config_sweeps_delta_target():
    target, note = dg.sweep_target(_config(method="kd"))
    assert target.variant.name == "delta" and "has no α" in note
    target, note = dg.sweep_target(_config(method="parallelogram", variant="student_anchor"))
    assert target.variant.name == "student_anchor"


def test_live_student_variant_uses_student_raw():
    # live_shift puts the live student inside the target: before training it is student_raw,
    # which makes the target Delta-KD's
    z = {r: torch.randn(4, 8) for r in ("teacher_ft", "teacher_raw", "student_raw")}
    live, _ = dg.sweep_target(_config(method="parallelogram", variant="live_shift"))
    delta, _ = dg.sweep_target(_config())
    assert torch.allclose(dg._target_logits(live, 0.7, z), dg._target_logits(delta, 0.7, z))


# --- the command -------------------------------------------------------------------------------


def test_cli_json_line(tmp_path, capsys):
    from deltakd.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("\n".join(f"{k}: {v}" for k, v in MINI.items()))
    rc = main(
        [
            "diagnose",
            str(cfg),
            "--rows",
            "2",
            "--alphas",
            "0.5,1",
            "--json",
            "--no-progress",
            "--corpus-docs",
            "5",
            "--student-sft",
            "mini:teacher_ft",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out.strip().splitlines()[-1])
    for key in (
        "premise_cosine",
        "teacher_seed_cosine",
        "kl_student_sft_to_target",
        "kl_student_sft_to_teacher_ft",
        "teacher_corpus_loss_ratio",
    ):
        assert isinstance(data[key], float) and math.isfinite(data[key]), key
    assert data["alphas"] == [0.5, 1.0] and data["top_k"] == [5, 64]
    assert "suggested α range" in out and "premise" in out


def test_cli_errors(tmp_path, capsys):
    from deltakd.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("\n".join(f"{k}: {v}" for k, v in MINI.items() if k != "teacher_raw"))
    # kd runs without teacher_raw, but Delta-KD's target (what diagnose sweeps) needs it
    assert main(["diagnose", str(cfg), "method=kd", "--no-progress"]) == 2
    assert "needs the config's teacher_raw" in capsys.readouterr().err
    assert main(["diagnose", str(cfg), "--no-progress"]) == 2  # the schema's own check
    assert "teacher_raw" in capsys.readouterr().err
    assert main(["diagnose", str(cfg), "teacher_raw=mini:teacher_raw", "--rows", "0"]) == 2
    assert "--rows 0" in capsys.readouterr().err


def test_mismatched_tokenizer_is_refused(tiny_world, tmp_path):
    with pytest.raises(VocabularyError, match="different tokenizer"):
        diagnose(_config(student_raw=str(tiny_world["student_raw"])), _opts())
    with pytest.raises(VocabularyError, match="teacher_ft2"):  # the second teacher too
        diagnose(_config(), _opts(teacher_ft2=str(tiny_world["teacher_ft"])))
    with pytest.raises(ConfigError, match="does not exist"):
        diagnose(_config(), _opts(student_sft=str(tmp_path / "no" / "such" / "model")))


def test_bad_corpus_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        dg._corpus_docs(_config(), _opts(corpus=str(tmp_path / "none.txt")))
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match="line 2"):
        dg._corpus_docs(_config(), _opts(corpus=str(bad)))
    good = tmp_path / "c.txt"
    good.write_text("one doc.\n\nanother doc.\n")
    docs = dg._corpus_docs(_config(), _opts(corpus=str(good)))[0]
    assert docs == ["one doc.", "another doc."]
    from deltakd.loading import load_tokenizer

    with pytest.raises(DataError, match="fewer than"):  # not even one packed block
        dg._corpus_loss(None, load_tokenizer("mini:tokenizer"), docs)


@pytest.mark.parametrize("peft", [{}, {"r": 2}], ids=["full", "lora"])
def test_sft_steps_trains_a_student(tiny_world, tmp_path, peft):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps(
                {"prompt": f"what is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."}
            )
            + "\n"
            for i in range(8)
        )
    )
    from deltakd.train.config import load_config
    from tests.conftest import tiny_run_fields

    config = load_config(
        None,
        {
            **tiny_run_fields(tiny_world, rows),
            "method": "delta_kd",
            "output_dir": str(tmp_path / "out"),
            "peft": peft,
        },
    )
    r = diagnose(config, _opts(sft_steps=3, rows=4))
    assert r["sft_steps"] == 3
    # the student moved (a zero shift would give cosine exactly 0 and equal KLs)
    assert r["premise_cosine"] != 0.0
    assert r["kl_student_sft_to_target"] != r["kl_student_sft_to_teacher_ft"]
    assert "teacher_corpus_loss_ratio" not in r  # no corpus known for this world
