"""`deltakd bench train --peers`: the same training job through deltakd and beside TRL's
GKDTrainer / a naive transformers.Trainer, with the step-1 losses checked equal; a missing peer
skips only its own row."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json

import pytest
import torch

from deltakd.bench import train_peers
from deltakd.cli import main

QUICK = ["--steps", "2", "--warmup", "1", "--batch", "2", "--turns", "2", "--threads", "1"]


@pytest.fixture
def in_process(monkeypatch):
    """Run each worker in this process (the driver's subprocess costs ~15 s of imports each)."""
    threads = torch.get_num_threads()

    def run_worker(impl, args):
        wargs = argparse.Namespace(**vars(args))
        wargs.worker = impl
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert train_peers._worker(wargs) == 0
        return json.loads(buf.getvalue().strip().splitlines()[-1])

    monkeypatch.setattr(train_peers, "_run_worker", run_worker)
    yield
    torch.set_num_threads(threads)


def _without_trl(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(train_peers.importlib.util, "find_spec",
                        lambda name, *a, **kw: None if name == "trl" else real(name, *a, **kw))  # fmt: skip


def test_missing_trl_skips_its_row_and_the_rest_agree_at_step_one(monkeypatch, capsys, in_process):
    _without_trl(monkeypatch)
    impls = "trl_gkd,naive_delta,deltakd_delta_fused"
    rc = main(["bench", "train", "--peers", "--json", "--impls", impls, *QUICK])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0, out
    skipped = [line for line in out if line.startswith("skipped ")]
    assert len(skipped) == 1 and skipped[0].startswith("skipped trl_gkd:")
    assert "'trl'" in skipped[0] and "pip install" in skipped[0]
    summary = json.loads(out[-1])
    assert set(summary["skipped"]) == {"trl_gkd"} and summary["failed"] == {}
    ran = ("naive_delta", "deltakd_delta_fused")
    assert all(impl in summary for impl in ran)
    assert list(summary["losses_agree"].values()) == [True]
    # the same computation: the same tokens in every step, the same step-1 loss
    naive, fused = summary["naive_delta"], summary["deltakd_delta_fused"]
    assert naive["tokens"] == fused["tokens"] and len(naive["tokens"]) == 2
    assert naive["losses"][0] > 0.1
    assert fused["losses"][0] == pytest.approx(naive["losses"][0], rel=1e-4)
    for impl in ran:
        r = summary[impl]
        assert r["tokens_per_s"] > 0 and r["peak_rss_bytes"] >= r["baseline_rss_bytes"] > 10 << 20
        assert not r["checkpointing"] and not r["bf16"]
    assert any("× naive_delta" in line for line in out)


def test_step_one_losses_that_differ_fail_the_bench(capsys):
    def row(loss, tokens=(10, 12)):
        return {"vocab": 7, "tokens": list(tokens), "response_tokens": [4, 5], "steps": 2,
                "tokens_per_s": 5.0, "response_tokens_per_s": 2.0, "peak_rss_bytes": 2 << 30,
                "baseline_rss_bytes": 1 << 30, "losses": [loss, loss], "seconds": 1.0,
                "peak_cuda_bytes": None}  # fmt: skip

    args = argparse.Namespace(warmup=1, steps=2)
    agree = train_peers._table({"trl_gkd": row(2.0), "deltakd_kd": row(2.0 * (1 + 1e-6))}, args)
    assert list(agree.values()) == [True]
    agree = train_peers._table({"trl_gkd": row(2.0), "deltakd_kd": row(2.01)}, args)
    assert list(agree.values()) == [False]
    agree = train_peers._table({"trl_gkd": row(2.0), "deltakd_kd": row(2.0, (10, 13))}, args)
    assert list(agree.values()) == [False]
    assert "DO NOT AGREE" in capsys.readouterr().out


def test_unknown_implementation_is_refused(capsys):
    assert main(["bench", "train", "--impls", "deltakd_kd,unsloth", *QUICK]) == 2
    assert "unsloth" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_train_peers_each_in_its_own_process(capsys):
    """The real driver: one subprocess per implementation, every row; TRL's when installed."""
    rc = main(["bench", "train", "--peers", "--json", *QUICK])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0, out
    summary = json.loads(out[-1])
    assert all(summary["losses_agree"].values())
    if importlib.util.find_spec("trl") is None:
        assert set(summary["skipped"]) == {"trl_gkd"}
    else:
        trl, ours = summary["trl_gkd"], summary["deltakd_kd_fused"]
        assert trl["tokens"] == ours["tokens"] and not trl["checkpointing"] and not trl["bf16"]
        assert ours["losses"][0] == pytest.approx(trl["losses"][0], rel=1e-4)
    kd, kd_fused = summary["deltakd_kd"], summary["deltakd_kd_fused"]
    assert kd["tokens"] == kd_fused["tokens"] and len(kd["tokens"]) == 2
    assert kd_fused["losses"][0] == pytest.approx(kd["losses"][0], rel=1e-4)
    assert summary["naive_delta"]["losses"][0] == pytest.approx(
        summary["deltakd_delta"]["losses"][0], rel=1e-4
    )
