"""`deltakd bench precision`: the Delta target's KL to float64 per reference precision."""

from __future__ import annotations

import json

from deltakd.cli import main


def test_bench_precision_orders_the_settings(capsys):
    argv = ["bench", "precision", "--json", "--n", "6", "--vocab", "3000", "--teacher-hidden",
            "256", "--student-hidden", "128", "--threads", "1", "--vocab-chunk", "1000"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    kl = {r["setting"]: r["kl_mean"] for r in out["rows"]}
    # float32 is exact to rounding; rounding the logits to bf16 costs far more than rounding
    # only the hidden states and heads; summing z* in bf16 adds its own rounding.
    assert abs(kl["fp32 throughout"]) < 1e-9
    assert kl["fp32 throughout"] < kl["fp32 logits from bf16"] < kl["bf16 logits"]
    assert kl["bf16 logits"] < kl["bf16 logits, z* in bf16"]
    assert 10 * kl["fp32 logits from bf16"] < kl["bf16 logits"]
    assert out["cheapest"] in kl


def test_bench_precision_cost_times_both_settings(capsys):
    argv = ["bench", "precision", "--cost", "--json", "--cost-n", "8", "--vocab", "2000",
            "--teacher-hidden", "64", "--student-hidden", "32", "--threads", "1", "--repeats",
            "1", "--vocab-chunk", "1000"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cases = {r["case"]: r for r in out["cost"]}
    assert set(cases) == {"fused Delta-KD loss", "dense logits, one role"}
    for r in cases.values():
        assert r["seconds_bf16_logits"] > 0 and r["seconds_fp32_product"] > 0
        assert r["time_ratio"] == r["seconds_fp32_product"] / r["seconds_bf16_logits"]
