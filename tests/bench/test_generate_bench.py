"""`deltakd bench generate` runs both backends on the same prompts and reports side by side."""

from __future__ import annotations

import json

import pytest

from deltakd.cli import main


def test_bench_generate_hf_only_quick(capsys: pytest.CaptureFixture) -> None:
    argv = ["bench", "generate", "--backends", "hf", "--limit", "1", "--max-new-tokens", "8"]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 2 and "vllm" not in result
    # two replies, each capped at 8 new tokens (stop token included)
    assert 0 < result["hf"]["new_tokens"] <= 16 and result["hf"]["tokens_per_s"] > 0


# Two child processes, one of which imports vLLM and builds an engine: about a minute here.
@pytest.mark.slow
@pytest.mark.vllm
def test_bench_generate_reports_both_backends(capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("vllm")
    argv = ["bench", "generate", "--limit", "2", "--max-new-tokens", "16", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["n"] == 4  # 2 prompts from each of mini:instruct and mini:math
    for backend in ("hf", "vllm"):
        r = result[backend]
        assert r["new_tokens"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 0
        assert r["load_s"] > 0 and r["first_reply_s"] > 0
    # greedy fp32 on the mini teacher: the backends write the same replies
    assert result["agree"] == 4 and result["agreement"] == 1.0
    assert result["hf"]["new_tokens"] == result["vllm"]["new_tokens"]
    assert "vllm / hf tokens/s" in out


def test_bench_generate_refuses_an_unknown_backend(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "generate", "--backends", "hf,sglang"]) == 2
    assert "expected a comma-separated subset of hf,vllm" in capsys.readouterr().err


def test_head32_student_is_the_mini_student_in_32_wide_heads(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from deltakd.bench.generate import build_head32_student
    from deltakd.data.vocab import resolve_model_path

    mini = AutoModelForCausalLM.from_pretrained(resolve_model_path("mini:student_raw"))
    built = AutoModelForCausalLM.from_pretrained(build_head32_student(str(tmp_path / "s")))
    c = built.config
    assert (c.head_dim, c.num_attention_heads, c.num_key_value_heads) == (32, 2, 1)
    assert c.hidden_size == mini.config.hidden_size
    a, b = mini.state_dict(), built.state_dict()
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (tmp_path / "s" / "tokenizer_config.json").exists()


# Two short trainings in child processes (each loads torch, transformers and the data): slow.
@pytest.mark.slow
def test_on_policy_step_time_counts_the_sampling(capsys: pytest.CaptureFixture) -> None:
    # The trainer draws and samples a step's batch before its step-begin callback; a step
    # timed begin-to-end left the sampling out (the figure the vLLM target is about).
    argv = ["bench", "generate", "--backends", "hf", "--limit", "1", "--max-new-tokens", "48",
            "--on-policy-steps", "3", "--on-policy-batch", "4", "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    hf = result["on_policy"]["hf"]
    assert 0 < hf["sample_s"] <= hf["step_s"]
    assert 0 < hf["sampled_tokens"] <= 48
