"""`deltakd bench loss`: three methods in their own processes, same loss, honest memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deltakd.bench.loss import PeakRSS, naive_bytes_estimate
from deltakd.cli import main

KEYS = {"seconds", "baseline_rss_bytes", "peak_rss_bytes"}


def test_bench_loss_json_tiny(capsys):
    rc = main(["bench", "loss", "--json", "--n", "48", "--vocab", "300", "--hidden", "16",
               "--chunk", "20", "--threads", "1"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("running fused") for line in out)
    summary = json.loads(out[-1])
    for method in ("naive", "chunked", "fused"):
        r = summary[method]
        assert set(r) >= KEYS
        assert r["seconds"] > 0
        assert r["peak_rss_bytes"] >= r["baseline_rss_bytes"] > 10 << 20
    # One set of inputs, three ways: the same loss.
    assert summary["fused"]["loss"] == pytest.approx(summary["naive"]["loss"], rel=1e-4)
    assert summary["chunked"]["loss"] == pytest.approx(summary["naive"]["loss"], rel=1e-4)
    assert summary["config"]["n"] == 48


def test_peak_probe_sees_an_allocation_made_after_the_baseline():
    import torch

    probe = PeakRSS()
    x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    peak = probe.peak()
    del x
    assert peak - probe.baseline >= 60 << 20


def test_naive_estimate_scales_with_positions_times_vocab():
    small = naive_bytes_estimate(1024, 151936, 1536, 4)
    big = naive_bytes_estimate(2048, 151936, 1536, 4)
    assert big - small >= 10 * 1024 * 151936 * 4  # ≥ ten more [1024, V] float32 arrays


def _worker(method: str, n: int, chunk: int, vocab: int = 60000, hidden: int = 32) -> dict:
    cmd = [sys.executable, "-m", "deltakd.bench.loss", "--worker", method, "--n", str(n),
           "--vocab", str(vocab), "--hidden", str(hidden), "--chunk", str(chunk),
           "--threads", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return r | {"extra": r["peak_rss_bytes"] - r["baseline_rss_bytes"]}


@pytest.mark.slow
def test_fused_extra_memory_follows_chunk_size_not_positions():
    vocab = 60000
    row = vocab * 4  # one float32 row of logits
    small_n = _worker("fused", 256, 64)
    big_n = _worker("fused", 2048, 64)
    big_chunk = _worker("fused", 2048, 512)
    naive = _worker("naive", 2048, 64)
    # 8× the positions: extra memory grows by far less than one [N, V] array ...
    assert big_n["extra"] - small_n["extra"] < 0.5 * 2048 * row
    # ... 8× the chunk: it grows by the two (chunk, V) buffers.
    assert big_chunk["extra"] - big_n["extra"] > 1.5 * (512 - 64) * row
    assert big_n["extra"] < 0.25 * naive["extra"]
