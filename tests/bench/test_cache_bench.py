"""`deltakd bench cache --json` on the tiny world: one row per k with the agreed keys."""

from __future__ import annotations

import json
import math


def test_bench_cache_json(tiny_world, tmp_path, capsys):
    from deltakd.cli import main

    world = tiny_world["tokenizer"].parent
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": p, "response": r}) + "\n"
            for p, r in [
                ("what colour is the fox?", "the fox is red."),
                ("seven plus six?", "seven plus six is thirteen."),
                ("what sings?", "the blue whale sings at night."),
                ("where is the fox?", "the red fox lives in the north forest."),
                ("twelve minus four?", "twelve minus four is eight."),
                ("what does alice have?", "alice has three apples and bob has five."),
            ]
        )
    )
    argv = ["bench", "cache", "--json", "--world", str(world), "--dataset", str(data),
            "--rows", "6", "--ks", "8,V", "--tail-ranks", "0,8", "--steps", "2", "--batch", "2",
            "--max-length", "48", "--repeats", "2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = json.loads(out.strip().splitlines()[-1])
    # k = V has no tail, so no tail-model row for it.
    assert [(r["k"], r["tail_rank"]) for r in rows] == [
        (8, 0),
        (8, 8),
        (tiny_world["vocab_size"], 0),
    ]
    for r in rows:
        assert set(r) == {"k", "tail_rank", "bytes_per_token", "kl_nats", "throughput_vs_sft",
                          "throughput_vs_local", "bytes_per_token_big_vocab"}  # fmt: skip
        assert r["throughput_vs_sft"] > 0 and r["throughput_vs_local"] > 0
    bucket, model, full = rows
    # uint16 ids + fp16 values: 4 bytes per entry plus 8 per position (+ headers, row tables);
    # the rank-8 model adds 8 fp16 coefficients (and one more tensor in each shard's header).
    # Even fitted on 3 short rows, the model spreads the tail better than uniformly.
    assert 8 * 4 + 8 < bucket["bytes_per_token"] < full["bytes_per_token"]
    assert 16 <= model["bytes_per_token"] - bucket["bytes_per_token"] < 20
    # Truncating to k = 8 of 320 tokens loses information, the tail model gives much of it
    # back; k = V only rounds to fp16.
    assert bucket["kl_nats"] > 1e-3
    assert model["kl_nats"] < 0.8 * bucket["kl_nats"]
    assert -1e-6 <= full["kl_nats"] < 1e-4
    # At V = 151936 auto ids are 3 bytes, not 2: 8 more per position at k = 8; k = V is skipped.
    assert bucket["bytes_per_token_big_vocab"] > bucket["bytes_per_token"] + 7
    assert full["bytes_per_token_big_vocab"] is None
    assert "tok/s" in out and "world" in out and "tail model file holds" in out


def test_bench_cache_packed_encoding(tiny_world, tmp_path, capsys):
    from deltakd.cli import main
    from deltakd.references.cache.packing import ef_bytes

    world = tiny_world["tokenizer"].parent
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}?", "response": r}) + "\n" for i, r in
                            enumerate(["the fox is red.", "seven plus six is thirteen.",
                                       "the blue whale sings at night.", "it eats berries."])))  # fmt: skip
    kl = {}
    for enc in (["--value-dtype", "fp16"], ["--index-dtype", "packed", "--value-dtype", "q8"]):
        argv = ["bench", "cache", "--json", "--world", str(world), "--dataset", str(data),
                "--rows", "4", "--ks", "8", "--tail-ranks", "0", "--steps", "0",
                "--max-length", "48", *enc]  # fmt: skip
        assert main(argv) == 0
        (row,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        kl[enc[-1]] = row["kl_nats"]
    # k = 8 of V = 151936: Elias–Fano ids + 8 one-byte levels + fp16 tail, plus the row table
    # and header spread over few positions.
    assert ef_bytes(151936, 8) + 8 + 2 < row["bytes_per_token_big_vocab"] < 8 * 5 + 8
    # 8-bit levels cost a little KL next to what k = 8 truncation costs.
    assert kl["fp16"] <= kl["q8"] < 1.05 * kl["fp16"]


def test_sparse_kl_definition():
    import torch

    from deltakd.bench.cache import sparse_kl
    from deltakd.losses import SparseTarget

    torch.manual_seed(0)
    z = torch.randn(5, 50) * 3
    logp = torch.log_softmax(z, -1)
    assert sparse_kl(logp, SparseTarget.from_logits(z, 50)).abs().max() < 1e-5
    t = SparseTarget.from_logits(z, 10)
    q = torch.full_like(logp, 0.0) + (t.tail_mass / 40).unsqueeze(-1)
    q.scatter_(-1, t.indices, t.logprobs.exp())
    want = (logp.exp() * (logp - q.log())).sum(-1)
    torch.testing.assert_close(sparse_kl(logp, t), want, atol=1e-5, rtol=1e-4)
    assert math.isfinite(float(want.mean())) and float(want.mean()) > 0


def test_bench_cache_kl_target_on_the_mini_world(capsys):
    """docs/BENCHMARKS.md's KL target: mean KL(dense ‖ sparse) ≤ 1e-3 nats at k = 64 on rows
    held out from the tail-model fit, with the rank-64 tail model (the bucket alone: ~6e-3).
    Deterministic; the throughput target is a benchmark figure, not a test (timings on a shared
    2-core machine move by ±0.05)."""
    from deltakd.cli import main

    argv = ["bench", "cache", "--json", "--ks", "64", "--tail-ranks", "0,64", "--steps", "0"]
    assert main(argv) == 0
    bucket, model = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (bucket["tail_rank"], model["tail_rank"]) == (0, 64)
    assert model["kl_nats"] <= 1e-3 < bucket["kl_nats"]
