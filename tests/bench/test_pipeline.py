"""`deltakd bench pipeline` and what its prefetch mode relies on.

Which mode waits less is a figure of `deltakd bench pipeline` (it depends on the machine's
load), not an assertion here. What does not depend on load is asserted: the trainer asks for
each batch's references before it needs them (a whole optimizer step ahead), and prefetched
replies are the same replies, so the runs train identically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from deltakd.cli import main
from deltakd.references.base import ReferenceBatch, ReferenceSource
from tests.conftest import tiny_run_fields


class Recorder(ReferenceSource):
    """Passes calls through to `inner` and records their order; `prefetch=False` drops
    prefetches (requests then go out in `fetch`, the bench's `servers` mode)."""

    def __init__(self, inner: ReferenceSource, *, prefetch: bool = True) -> None:
        self.inner, self.prefetching = inner, prefetch
        self.roles = inner.roles
        self.events: list[tuple[str, int]] = []
        self.replies: dict[int, ReferenceBatch] = {}

    def prefetch(self, key: int, batch: Mapping[str, Any]) -> None:
        self.events.append(("prefetch", key))
        if self.prefetching:
            self.inner.prefetch(key, batch)

    def fetch(self, key: int, batch: Mapping[str, Any]) -> ReferenceBatch:
        self.events.append(("fetch", key))
        self.replies[key] = reply = self.inner.fetch(key, batch)
        return reply

    def lm_heads(self) -> dict[str, Any]:
        return self.inner.lm_heads()


def _run(world: dict, tmp: Path, name: str, refs: ReferenceSource) -> list[float]:
    from deltakd.train import load_config, train

    data = tmp / "train.jsonl"
    if not data.exists():
        rows = [{"prompt": f"what is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."}
                for i in range(12)]  # fmt: skip
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    fields = {**tiny_run_fields(world, data), "method": "kd", "max_steps": 3, "shuffle": False,
              "per_device_batch_size": 2, "gradient_accumulation_steps": 2,
              "output_dir": str(tmp / name)}  # fmt: skip
    result = train(load_config(None, fields), references=refs)
    return [v for _, v in result.losses()]


def _check_ahead_and_same(world: dict, tmp: Path, make_source: Any) -> None:
    ahead = Recorder(make_source())
    on_demand = Recorder(make_source(), prefetch=False)
    losses_ahead = _run(world, tmp, "ahead", ahead)
    losses_on_demand = _run(world, tmp, "on_demand", on_demand)
    # Each step has 2 micro-batches (keys 2s, 2s+1). Every key is prefetched before it is
    # fetched, and the keys of step s+1 before the first fetch of step s: a step ahead.
    order = {event: i for i, event in enumerate(ahead.events)}
    fetched = [k for kind, k in ahead.events if kind == "fetch"]
    assert fetched == list(range(6))
    for k in fetched:
        assert order[("prefetch", k)] < order[("fetch", k)]
        if k >= 2:
            assert order[("prefetch", k)] < order[("fetch", 2 * (k // 2 - 1))], ahead.events
    # The replies are the same with or without prefetch, so training is too.
    import torch

    for k in fetched:
        a, b = ahead.replies[k], on_demand.replies[k]
        assert a.logits.keys() == b.logits.keys()
        for role in a.logits:
            torch.testing.assert_close(a.logits[role], b.logits[role])
    assert losses_ahead == pytest.approx(losses_on_demand, rel=1e-6)


def test_references_are_asked_for_a_step_ahead_and_match(tiny_world: dict, tmp_path: Path):
    from deltakd.references.local import LocalReferences

    _check_ahead_and_same(
        tiny_world, tmp_path, lambda: LocalReferences({"teacher_ft": str(tiny_world["teacher_ft"])})
    )


@pytest.mark.slow
def test_server_replies_are_prefetched_and_match(tiny_world: dict, tmp_path: Path):
    from deltakd.references.client import from_settings

    sources: list[Any] = []

    def servers() -> Any:
        src = from_settings({"threads": 1, "dtype": "fp32"},
                            {"teacher_ft": str(tiny_world["teacher_ft"])})  # fmt: skip
        sources.append(src)
        return src

    try:
        _check_ahead_and_same(tiny_world, tmp_path, servers)
    finally:
        for src in sources:
            src.close()


@pytest.mark.slow
def test_bench_pipeline_reports_every_mode(tiny_world: dict, capsys: pytest.CaptureFixture) -> None:
    world = tiny_world["tokenizer"].parent  # tokenizer/, teacher_ft/, teacher_raw/, student_raw/
    argv = ["bench", "pipeline", "--world", str(world), "--method", "kd", "--steps", "3"]
    assert main([*argv, "--batch", "2", "--max-length", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for mode in ("local", "servers", "servers_prefetch"):
        assert result[f"{mode}_steps_per_s"] > 0
        assert 0.0 <= result[f"{mode}_wait_fraction"] <= 1.0
